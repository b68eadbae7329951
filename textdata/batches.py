"""Tokenized splits and how they are cut into batches: padding, length buckets, micro-batches."""
from dataclasses import dataclass
import hashlib

import torch

from model import EOT
from runtime.devices import to_device
from runtime.distributed import main_first
from textdata.readers import encode, load_text_data

IGNORE = -100  # a position without a target: PyTorch's ignore_index, transformers' label for "no loss here"


@dataclass
class Split:
    """Tokenized sentences of one split, with label ids and (for distillation) the teacher's logits, or (for a
    language model) each position's target token (IGNORE where there is none)."""
    tokens: list
    labels: torch.Tensor
    teacher: torch.Tensor = None
    targets: list = None

    def __len__(self):
        return len(self.tokens)

    def subset(self, rows):
        """The split's rows `rows` (a list of indices), in that order, with what they carry."""
        return Split([self.tokens[i] for i in rows], self.labels[rows],
                     None if self.teacher is None else self.teacher[rows],
                     None if self.targets is None else [self.targets[i] for i in rows])

    def units(self, rows):
        """What the loss of `rows` averages over: the sentences, or a language model's target tokens."""
        if self.targets is None:
            return len(rows)
        return sum(len(self.targets[i]) - self.targets[i].count(IGNORE) for i in rows)


class Splits(dict):
    """{'train', 'dev'[, 'ood'][, 'heldout']}: Split, with the dataset they come from (`spec`), its label names,
    what reports call each evaluation split, and notes for the summary."""

    def __init__(self, spec, data):
        super().__init__()
        self.spec, self.labels, self.titles, self.notes = spec, tuple(data.labels), data.titles, data.notes
        self.task = "classify"  # or "lm": lm_data.load_lm_splits

    def identity(self):
        """What a model trained on these splits records of them, for `distil` to check its teacher by."""
        return {"dataset": self.spec.slug, "dataset_name": self.spec.name, "labels": list(self.labels)}

    @property
    def evaluated(self):
        """The evaluation splits: 'dev', and 'ood' when the dataset has a second labelled one."""
        return [name for name in ("dev", "ood") if name in self]


def load_splits(spec, tokenizer, *, block_size=None, max_examples=None, seed=0):
    """Tokenized splits {'train', 'dev'[, 'ood'][, 'heldout']} of the dataset `spec` names: see hold_out for
    'heldout'; `max_examples` then takes a seeded random subset of the rest of the training set."""
    with main_first():  # one download, not one per rank
        data = load_text_data(spec)
    splits = Splits(spec, data)
    for name, (sentences, labels) in data.splits.items():
        tokens = encode(tokenizer, sentences)
        if block_size:  # never for CoLA (at most 45 tokens); past the context keep the end, whose last token is read
            tokens = [t[-block_size:] for t in tokens]
        splits[name] = Split(tokens, torch.tensor(labels))
    hold_out(splits)
    if max_examples:
        keep = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))
        splits["train"] = splits["train"].subset(keep[:max_examples].tolist())
    return splits


HELD_OUT_EVERY, FEWEST_TO_HOLD_OUT = 10, 200


def held_out(tokens):
    """Whether a training sentence is held out: a property of the sentence alone (its hash), so every run, seed and
    --max_examples holds out the same sentences, and a teacher never trained on what its student calibrates on."""
    return int(hashlib.sha256(repr(tokens).encode()).hexdigest()[:8], 16) % HELD_OUT_EVERY == 0


def hold_out(splits):
    """Move about one training sentence in HELD_OUT_EVERY to splits['heldout'], which no model trains on: the
    temperature of temperature scaling is fitted there, never on dev. A training set of fewer than
    FEWEST_TO_HOLD_OUT sentences keeps them all (a tenth of it would fit no temperature)."""
    train = splits["train"]
    if len(train) < FEWEST_TO_HOLD_OUT:
        return
    out = [held_out(t) for t in train.tokens]
    for name, keep in (("heldout", True), ("train", False)):
        rows = [i for i, o in enumerate(out) if o == keep]
        splits[name] = train.subset(rows)


def data_fingerprint(splits):
    """A short hash of the exact training and evaluation data ({name: object with .tokens and .labels})."""
    h = hashlib.sha256()
    for name in sorted(splits):
        split = splits[name]
        h.update(repr((split.tokens, split.labels.tolist()) + ((split.targets,) if split.targets else ())).encode())
    return h.hexdigest()[:16]


def split_fingerprints(splits):
    """{split: fingerprint} of each split, so that a resumed run can say which one changed."""
    return {name: data_fingerprint({name: split}) for name, split in splits.items()}


def padded(seqs, value):
    """(len(seqs), longest) long tensor of the sequences, right-padded with `value`."""
    out = torch.full((len(seqs), max(len(s) for s in seqs)), value, dtype=torch.long)
    for row, s in enumerate(seqs):
        out[row, :len(s)] = torch.tensor(s)
    return out


def collate(split, index, device):
    """Right-pad the sentences at `index` to the longest of them: (ids, lengths, labels, teacher); a language
    model's labels are its targets per position, padded with IGNORE."""
    seqs = [split.tokens[i] for i in index]
    lengths = torch.tensor([len(s) for s in seqs])
    labels = split.labels[index] if split.targets is None else padded([split.targets[i] for i in index], IGNORE)
    teacher = None if split.teacher is None else to_device(split.teacher[index], device)
    return to_device(padded(seqs, EOT), device), to_device(lengths, device), to_device(labels, device), teacher


def bucketed_batches(lengths, batch_size, generator, bucket=16):
    """Shuffle, then sort each run of `bucket` batches by length, so a batch holds similar lengths and needs
    little padding; the batches themselves are shuffled again so lengths do not come in order."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(perm), batch_size * bucket):
        chunk = sorted(perm[start:start + batch_size * bucket], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def sorted_batches(lengths, batch_size):
    """Batches for inference: sorted by length (least padding), in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def micro_batches(index, lengths, max_tokens):
    """Cut a batch into consecutive pieces of at most `max_tokens` padded tokens (None: no cut). Gradients are
    accumulated over the pieces, so a step still sees the whole batch while activations stay bounded."""
    if not max_tokens:
        return [index]
    rows = max(1, max_tokens // max(lengths[i] for i in index))
    return [index[i:i + rows] for i in range(0, len(index), rows)]
