"""The one training loop and evaluation every mode uses, the losses, the metrics, the plots and the run log.

A mode (LoRA, rnn, distil) supplies a model `model(ids, lengths) -> logits (B, n_classes)` and a loss
`loss_fn(logits, labels, teacher) -> scalar`; nothing else differs.
"""
import contextlib
import json
import math
import os
import statistics
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F
from tqdm import tqdm

from model import count_parameters
from utils import (EOT, LABELS, DataSpec, Terminated, UserError, all_reduce_sum, atomic_path, broadcast_from_main,
                   compiled, data_fingerprint, default_micro_batch_tokens, encode, everyone, flags,
                   interrupt_exit_code, is_main, load_text_data, loss_scaler, main_first, on_main, rank, read_jsonl,
                   read_tensors, result_flags, world_size, write_jsonl_record)

TUNING_DIR, PLOTS_DIR = "tuning", "plots"  # run logs and plots, relative to where a run is started


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    """Tokenized sentences of one split, with label ids and (for distillation) the teacher's logits."""
    tokens: list
    labels: torch.Tensor
    teacher: torch.Tensor = None

    def __len__(self):
        return len(self.tokens)


class Splits(dict):
    """{'train', 'dev'[, 'ood']}: Split, with the dataset they come from (`spec`), its label names, what reports call
    each evaluation split, and notes for the summary."""

    def __init__(self, spec, data):
        super().__init__()
        self.spec, self.labels, self.titles, self.notes = spec, tuple(data.labels), data.titles, data.notes

    def identity(self):
        """What a model trained on these splits records of them, for `distil` to check its teacher by."""
        return {"dataset": self.spec.slug, "dataset_name": self.spec.name, "labels": list(self.labels)}

    @property
    def evaluated(self):
        """The evaluation splits: 'dev', and 'ood' when the dataset has a second labelled one."""
        return [name for name in ("dev", "ood") if name in self]


def run_stem(mode, spec):
    """The name of a run's log and plots: the mode alone for CoLA, the mode and the dataset otherwise."""
    return mode if spec.is_cola else f"{mode}-{spec.slug}"


def load_splits(spec, tokenizer, *, block_size=None, max_examples=None, seed=0):
    """Tokenized splits {'train', 'dev'[, 'ood']} of the dataset `spec` names; `max_examples` takes a seeded random
    subset of the training set."""
    with main_first():  # one download, not one per rank
        data = load_text_data(spec)
    splits = Splits(spec, data)
    for name, (sentences, labels) in data.splits.items():
        tokens = encode(tokenizer, sentences)
        if block_size:  # never for CoLA (at most 45 tokens); past the context keep the end, whose last token is read
            tokens = [t[-block_size:] for t in tokens]
        splits[name] = Split(tokens, torch.tensor(labels))
    if max_examples:
        keep = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))
        keep = keep[:max_examples].tolist()
        train = splits["train"]
        splits["train"] = Split([train.tokens[i] for i in keep], train.labels[keep])
    return splits


def collate(split, index, device):
    """Right-pad the sentences at `index` to the longest of them: (ids, lengths, labels, teacher)."""
    seqs = [split.tokens[i] for i in index]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), max(len(s) for s in seqs)), EOT, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    teacher = None if split.teacher is None else to_device(split.teacher[index], device)
    return to_device(ids, device), to_device(lengths, device), to_device(split.labels[index], device), teacher


def to_device(t, device):
    """A host tensor on `device`; to a GPU from pinned memory, without waiting for the copy (pinning needs CUDA)."""
    if device.type != "cuda":
        return t.to(device)
    return t.pin_memory().to(device, non_blocking=True)


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


def autocast(device, dtype):
    """Mixed precision for `dtype` lower than fp32, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- losses and metrics

def cross_entropy(logits, labels, teacher=None):
    """Supervised loss on the labels alone (LoRA and the no-KD student)."""
    return F.cross_entropy(logits.float(), labels)


def kd_loss(student, teacher, labels, temperature, alpha):
    """Hinton et al.'s distillation loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    T^2 keeps the soft part's gradients on the scale of the hard part's as T grows.
    """
    T = temperature
    soft = F.kl_div(F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.float() / T, -1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student.float(), labels)
    return alpha * T * T * soft + (1 - alpha) * hard


def cached_teacher_logits(cache, build_teacher, splits, *, batch_size, device, dtype):
    """The teacher's logits on every split, its size and speed: read from the file `cache` when every rank has it
    (machines need not share a disk), else computed with the model `build_teacher()` returns and written there."""
    if everyone(cache.exists()):
        print(f"teacher logits from cache {cache}")
        return read_tensors(cache)
    teacher = build_teacher()
    logits = {"parameters": torch.tensor(count_parameters(teacher)[0])}
    for name, split in splits.items():
        start = time.perf_counter()
        logits[name] = predict_logits(teacher, split.tokens, batch_size=batch_size, device=device, dtype=dtype)
        logits[f"{name}_seconds"] = torch.tensor(time.perf_counter() - start)

    def write_cache():
        from safetensors.torch import save_file
        with atomic_path(cache) as tmp:
            save_file({k: v.contiguous() for k, v in logits.items()}, tmp)

    on_main(write_cache)
    return logits


class KDLoss:
    def __init__(self, temperature, alpha):
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits, labels, teacher):
        return kd_loss(logits, teacher, labels, self.temperature, self.alpha)


def class_counts(values, n_classes, weights=None):
    """How often each class occurs in each row, (..., N) -> (..., n_classes), each occurrence counted `weights`."""
    weights = torch.ones_like(values, dtype=torch.double) if weights is None else weights.double()
    return torch.zeros(*values.shape[:-1], n_classes, dtype=torch.double).scatter_add_(-1, values, weights)


def mcc_rows(preds, labels):
    """MCC of each row of predictions against the same row of labels (..., N) -> (...), in its multi-class form
    (Gorodkin's, as scikit-learn computes it; the familiar formula for two classes): (c s - t.p) over
    sqrt((s^2 - p.p)(s^2 - t.t)), t and p the true and predicted class counts, c the correct ones, s the total.
    0 where that is undefined (e.g. one class only)."""
    preds, labels = preds.long(), labels.long()
    n_classes = int(max(preds.max(), labels.max())) + 1
    t, p = class_counts(labels, n_classes), class_counts(preds, n_classes)
    c, s = (preds == labels).sum(-1).double(), labels.size(-1)
    denom = ((s * s - (p * p).sum(-1)) * (s * s - (t * t).sum(-1))).sqrt()
    return torch.where(denom > 0, (c * s - (t * p).sum(-1)) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def macro_f1_rows(preds, labels):
    """Macro-F1 of each row (..., N) -> (...): the mean F1 = 2 TP / (true + predicted) over the classes present in
    the labels or the predictions, as scikit-learn averages it."""
    preds, labels = preds.long(), labels.long()
    n_classes = int(max(preds.max(), labels.max())) + 1
    t, p = class_counts(labels, n_classes), class_counts(preds, n_classes)
    tp = class_counts(labels, n_classes, weights=preds == labels)
    present = (t + p) > 0
    return (2 * tp / (t + p).clamp_min(1)).sum(-1) / present.sum(-1)


def matthews_corrcoef(preds, labels):
    return float(mcc_rows(torch.as_tensor(preds), torch.as_tensor(labels)))


def macro_f1(preds, labels):
    return float(macro_f1_rows(torch.as_tensor(preds), torch.as_tensor(labels)))


def wilson_interval(correct, n, level=0.95):
    """Wilson score interval of a proportion correct/n (sound near 0 and 1, unlike the normal approximation)."""
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap(metric_rows, preds, labels, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of a metric: resample sentences with replacement (seeded)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(labels), (resamples, len(labels)), generator=g)
    values = metric_rows(preds[idx], labels[idx])
    low, high = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double)).tolist()
    return low, high


def bootstrap_mcc(preds, labels, resamples=1000, seed=0, level=0.95):
    return bootstrap(mcc_rows, preds, labels, resamples, seed, level)


def mcnemar_exact(correct_a, correct_b):
    """McNemar's exact test on paired per-sentence correctness: (only A right, only B right, two-sided p)."""
    a, b = torch.as_tensor(correct_a).bool(), torch.as_tensor(correct_b).bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return only_a, only_b, p


def scores(preds, labels, n_classes=2):
    """Accuracy with its Wilson interval and MCC with its bootstrap interval, for a prediction vector; with more
    than two classes, macro-F1 and its bootstrap interval too (for two, MCC already weighs both classes)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    correct = int((preds == labels).sum())
    out = {"acc": correct / len(labels), "acc_ci": wilson_interval(correct, len(labels)),
           "mcc": matthews_corrcoef(preds, labels), "mcc_ci": bootstrap_mcc(preds, labels)}
    if n_classes > 2:
        out |= {"f1": macro_f1(preds, labels), "f1_ci": bootstrap(macro_f1_rows, preds, labels)}
    return out


def score_headers(title, n_classes):
    return [f"{title} acc", "MCC"] + (["macro-F1"] if n_classes > 2 else [])


def score_cells(s):
    """Table cells: 'acc% [low, high]', 'MCC [low, high]' and, when scored, 'macro-F1 [low, high]'."""
    (al, ah), (ml, mh) = s["acc_ci"], s["mcc_ci"]
    cells = [f"{s['acc']:.2%} [{al:.1%}, {ah:.1%}]", f"{s['mcc']:+.3f} [{ml:+.2f}, {mh:+.2f}]"]
    if "f1" in s:
        cells.append(f"{s['f1']:.3f} [{s['f1_ci'][0]:.2f}, {s['f1_ci'][1]:.2f}]")
    return cells


def majority_label(train_labels):
    """The training set's most common label: always answering it is the baseline (MCC 0). A tie goes to the
    higher label, as it always did for CoLA's two."""
    counts = torch.bincount(torch.as_tensor(train_labels).long())
    return int(torch.nonzero(counts == counts.max()).max())


# ----------------------------------------------------------------------------- the loop

class Diverged(UserError):
    """The loss became NaN or infinite."""


def activation_bytes_per_token(model):
    """An estimate of what training keeps for backward per token: the input and output widths of every linear and
    recurrent layer, in fp32, four times over for what sits beside them (attention, GELU, LayerNorm, casts)."""
    width = 0
    for m in model.modules():
        if isinstance(m, torch.nn.Linear):
            width += m.in_features + m.out_features
        elif isinstance(m, torch.nn.RNNBase):
            width += m.num_layers * (m.input_size + 4 * m.hidden_size)
    return 16 * width


class PieceBudget:
    """Padded tokens per micro-batch (None: whole batches), halved for the rest of the run each time CUDA runs out of
    memory, down to one sentence per piece."""

    def __init__(self, tokens):
        self.tokens = tokens

    def pieces(self, rows, lengths):
        return micro_batches(rows, lengths, self.tokens)

    def halve(self, rows, lengths):
        longest = max(lengths[i] for i in rows)
        old = self.tokens or len(rows) * longest
        if old // longest <= 1:
            raise UserError(f"CUDA out of memory with one sentence ({longest} tokens) per piece, the least "
                            "--micro_batch_tokens can give: free GPU memory, or use a smaller --gpt_variant")
        self.tokens = old // 2
        tqdm.write(f"CUDA out of memory with pieces of {old} tokens: retrying the step, and going on, with "
                   f"{self.tokens} (--micro_batch_tokens sets it)", file=sys.stderr)


def micro_batches(index, lengths, max_tokens):
    """Cut a batch into consecutive pieces of at most `max_tokens` padded tokens (None: no cut). Gradients are
    accumulated over the pieces, so a step still sees the whole batch while activations stay bounded."""
    if not max_tokens:
        return [index]
    rows = max(1, max_tokens // max(lengths[i] for i in index))
    return [index[i:i + rows] for i in range(0, len(index), rows)]


def rank_share(index):
    """This rank's rows of a global batch and whether they count (the whole batch in a single process). A rank left
    without rows, when a batch is smaller than the world, runs one row that counts 0, to join the gradient sync."""
    size = -(-len(index) // world_size())
    share = index[rank() * size:(rank() + 1) * size]
    return (share, 1) if share else (index[:1], 0)


def train_epoch(model, split, loss_fn, optimizer, *, batch_size, generator, device, dtype, clip=None,
                micro_batch_tokens=None, scaler=None, desc="train", on_step=None):
    """One pass over `split` in length-bucketed batches, each cut into micro-batches whose gradients accumulate.
    Returns this process's sums {loss, correct, tokens, skipped} (summed over ranks by the caller under torchrun).

    `scaler` (fp16: see utils.loss_scaler) skips, and the sums count, a step whose gradients overflowed.
    `micro_batch_tokens` is a number or a PieceBudget, which a CUDA out-of-memory error halves."""
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    budget = micro_batch_tokens if isinstance(micro_batch_tokens, PieceBudget) else PieceBudget(micro_batch_tokens)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lengths = [len(t) for t in split.tokens]
    sums = EpochSums(device, desc)
    # disable=None: a bar on a terminal, none in logs and CI (and on ranks other than 0)
    bar = tqdm(bucketed_batches(lengths, batch_size, generator), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if is_main() else True)
    for step, index in enumerate(bar, start=1):
        optimizer.zero_grad(set_to_none=True)
        # torchrun, 1 of 2: every rank draws the same global batch and trains its share. DDP averages gradients
        # over ranks, so weighting each row world/len(index) makes the result the gradient of the batch's mean loss.
        rows, counts = rank_share(index)
        row_weight = counts * world_size() / len(index)
        pieces = None
        while pieces is None:  # None: CUDA ran out of memory; the step starts again with pieces half the size
            pieces = gradients_unless_out_of_memory(model, split, budget.pieces(rows, lengths), loss_fn, device=device,
                                                    dtype=dtype, scaler=scaler, row_weight=row_weight)
            if pieces is None:
                optimizer.zero_grad(set_to_none=True)
                budget.halve(rows, lengths)
        finite = unscale_and_clip(optimizer, scaler, params, clip)
        sums.add_step(step, pieces, row_weight, counts, finite, scaler.is_enabled())  # raises Diverged
        scaler.step(optimizer)
        scaler.update()
        if sums.due(step, len(bar)):
            loss = sums.read(step)
            bar.set_postfix(loss=f"{loss:.4f}")
            if on_step:
                on_step(step, loss)
    return sums.totals()


def gradients_unless_out_of_memory(*args, **kwargs):
    """accumulate_gradients, or None if CUDA runs out of memory. Returning from outside the handler lets the
    failed attempt's tensors, which its traceback holds, be freed before the retry."""
    try:
        return accumulate_gradients(*args, **kwargs)
    except torch.OutOfMemoryError:
        return None


def accumulate_gradients(model, split, pieces, loss_fn, *, device, dtype, scaler, row_weight):
    """Backward through each piece of a step's rows; returns [(loss, correct, rows, tokens)] per piece, the loss
    and correct count as tensors where they were computed."""
    out = []
    for i, piece in enumerate(pieces):
        # torchrun, 2 of 2: gradients are reduced across ranks once per step, after the last piece (setting
        # the flag, as nanoGPT does, spares wrapping each piece in the no_sync() context manager).
        model.require_backward_grad_sync = i == len(pieces) - 1
        ids, lens, labels, teacher = collate(split, piece, device)
        with autocast(device, dtype):
            logits = model(ids, lens)
        loss = loss_fn(logits, labels, teacher)
        scaler.scale(loss * len(piece) * row_weight).backward()
        out.append((loss.detach(), (logits.argmax(-1) == labels).sum(), len(piece),
                    sum(len(split.tokens[j]) for j in piece)))
    return out


def unscale_and_clip(optimizer, scaler, params, clip):
    """Unscale the gradients (fp16), clip them to norm `clip` if given; returns whether they are all finite, as a
    tensor on their device (reading it would wait for the GPU)."""
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return torch.isfinite(norm)


READ_EVERY = 50  # steps between two reads of the running sums on CUDA


def defers_reads(device):
    """On CUDA, reading a value back to the host waits for every queued kernel, so the loop reads its sums every
    READ_EVERY steps only; on a CPU a read costs nothing, and each step is read at once."""
    return device.type == "cuda"


class EpochSums:
    """An epoch's sums of loss, correct predictions, tokens and skipped steps, and its guard against a non-finite
    loss. Read at once per step (CPU: a NaN stops the run naming its step), or (CUDA) kept as tensors on the device
    and read every READ_EVERY steps (a NaN then names the steps since the last read)."""

    def __init__(self, device, desc):
        self.lazy, self.desc = defers_reads(device), desc
        self.loss, self.correct, self.tokens, self.skipped = 0.0, 0, 0, 0
        self.step_loss, self.bad, self.last_read = 0.0, False, 0

    def add_step(self, step, pieces, row_weight, counts, grads_finite, scaling):
        """Add one step's pieces. A non-finite loss stops the run, and so do non-finite gradients without loss
        scaling; with it, their step is skipped by the scaler and counted here."""
        self.step_loss, bad_loss = 0.0, None
        for loss, correct, rows, tokens in pieces:
            if self.lazy:
                loss = loss.double()
                self.bad = self.bad | ~torch.isfinite(loss)
            else:
                loss, correct = loss.item(), int(correct)
                bad_loss = loss if bad_loss is None and not math.isfinite(loss) else bad_loss
            self.step_loss += loss * rows * row_weight
            self.loss += loss * rows * counts
            self.correct += correct * counts
            self.tokens += tokens * counts
        if self.lazy:
            self.bad = self.bad | (~grads_finite & (not scaling))
            self.skipped += ~grads_finite & scaling
        elif bad_loss is not None or not (grads_finite or scaling):
            raise Diverged(f"{self.desc}: loss became {'nan' if bad_loss is None else bad_loss} at step {step}; "
                           "try a lower --lr")
        else:
            self.skipped += int(not grads_finite)

    def due(self, step, steps):
        return not self.lazy or step % READ_EVERY == 0 or step == steps

    def read(self, step):
        """The last step's loss; on CUDA, first the check for a non-finite loss since the last read."""
        if self.lazy and bool(self.bad):
            raise Diverged(f"{self.desc}: loss became nan or inf in steps {self.last_read + 1}-{step} (on CUDA the "
                           f"loss is read every {READ_EVERY} steps); try a lower --lr")
        self.last_read = step
        return float(self.step_loss)

    def totals(self):
        return {"loss": float(self.loss), "correct": int(self.correct), "tokens": self.tokens,
                "skipped": int(self.skipped)}


@torch.no_grad()
def predict_logits(model, tokens, *, batch_size, device, dtype):
    """Logits (N, n_classes) for a list of token lists, in their order (batched by length internally).

    Under torchrun the batches are dealt out to the ranks and the logits summed back, so each sentence runs on
    exactly one rank and every rank ends with all of them."""
    was_training = model.training
    model.eval()
    lengths = [len(t) for t in tokens]
    dummy = Split(tokens, torch.zeros(len(tokens), dtype=torch.long))
    out = torch.zeros(len(tokens), model.n_classes)
    for index in sorted_batches(lengths, batch_size)[rank()::world_size()]:
        ids, lens, _, _ = collate(dummy, index, device)
        with autocast(device, dtype):
            out[index] = model(ids, lens).float().cpu()
    model.train(was_training)
    if world_size() > 1:
        import torch.distributed as dist
        out = out.to(device)
        dist.all_reduce(out)
        out = out.cpu()
    return out


def evaluate(model, split, loss_fn, *, batch_size, device, dtype):
    """Loss, accuracy, MCC, predictions (in split order) and inference speed on a labelled split."""
    start = time.perf_counter()
    logits = predict_logits(model, split.tokens, batch_size=batch_size, device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    preds = logits.argmax(-1)
    return {"loss": float(loss_fn(logits, split.labels, split.teacher)),
            "acc": float((preds == split.labels).float().mean()),
            "mcc": matthews_corrcoef(preds, split.labels),
            "sentences_per_s": len(split) / seconds,
            "preds": preds.tolist()}


def trainable_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM, with the exit code the signal calls for."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def rng_states():
    """Every rank's RNG states (dropout draws differ per rank), gathered on all ranks."""
    import torch.distributed as dist
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [mine]
    everyone_states = [None] * world_size()
    dist.all_gather_object(everyone_states, mine)
    return everyone_states


def save_run_state(path, run, model, optimizer, scaler, generator, config, rng):
    """Everything needed to continue after the last finished epoch, written atomically."""
    state = dict(run, model=trainable_state(model), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 generator=generator.get_state(), rng=rng, config=config)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_run_state(path, config):
    """A saved run, refusing one made with other flags."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"--resume: no saved run at {path}; start the run without --resume") from None
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated run state ({type(e).__name__})") from None
    changed = [k for k in config if state["config"].get(k) != config[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{path}: saved with --{k} {state['config'].get(k)}, this run has --{k} {config[k]}; "
                        "rerun with the same flags, or without --resume")
    if len(state["rng"]) != world_size():
        raise UserError(f"{path}: saved by {len(state['rng'])} processes, resumed by {world_size()}")
    return state


def load_run_state(path, model, optimizer, scaler, generator, config):
    """Restore a run saved by save_run_state. Rank 0 reads the file and every rank gets its content (or the
    same error), so several machines need not share a disk."""
    state, error = None, None
    if is_main():
        try:
            state = read_run_state(path, config)
        except UserError as e:
            error = str(e)
    state, error = broadcast_from_main((state, error))
    if error:
        raise UserError(error)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # fp16 runs: the loss scale reached
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"][rank()]["cpu"])
    if state["rng"][rank()]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"][rank()]["cuda"])
    return {k: state[k] for k in ("run_id", "epoch", "history", "best_epoch", "best_acc", "best_state", "best_dev")}


def for_all_ranks(model, device):
    """Under torchrun, the model wrapped so that gradients of its trainable parameters are averaged across ranks;
    the model itself in a single process."""
    if world_size() == 1:
        return model
    from torch.nn.parallel import DistributedDataParallel
    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda" else None)


def epoch_record(epoch, train, n, train_seconds, dev):
    """One row of the run's history, from this epoch's training sums (over all ranks) and dev evaluation."""
    return {"epoch": epoch, "train_loss": train["loss"] / n, "train_acc": train["correct"] / n,
            "dev_loss": dev["loss"], "dev_acc": dev["acc"], "dev_mcc": dev["mcc"], "train_seconds": train_seconds,
            "train_tokens_per_s": train["tokens"] / train_seconds, "skipped_steps": int(train["skipped"])}


def print_epoch(h, epochs):
    tqdm.write(f"epoch {h['epoch']:>2}/{epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}  |  "
               f"dev loss {h['dev_loss']:.4f} acc {h['dev_acc']:.2%} MCC {h['dev_mcc']:+.3f}  "
               f"({h['train_seconds']:.1f}s, {h['train_tokens_per_s']:,.0f} tok/s)"
               + (f"  [{h['skipped_steps']} steps skipped: fp16 gradients overflowed]" if h.get("skipped_steps")
                  else ""))


@contextlib.contextmanager
def stopping_keeps_state(when, saved, state_path):
    """Turn Ctrl-C, SIGTERM and a diverged loss (`when`: "during epoch 2") into one line saying what is on disk."""
    kept = f"the state after epoch {saved} is in {state_path}" if saved else "nothing saved"
    try:
        yield
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (utils.Terminated)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        hint = "; rerun the same command with --resume to continue" if saved else ""
        raise Interrupted(f"{what} {when}; {kept}{hint}", interrupt_exit_code(e)) from None
    except Diverged as e:
        raise Diverged(f"{e} ({kept})") from None


def fit(model, loss_fn, data, *, epochs, batch_size, lr, device, dtype, seed, clip=None, micro_batch_tokens=None,
        state_path=None, resume=False, config=None, compile=False, on_step=None, on_epoch=None):
    """Train for `epochs` with Adam, evaluating on data['dev'] after each; the best epoch (dev accuracy) is
    restored at the end. After each epoch the run's state goes to `state_path`, from which `resume` continues
    exactly, and `on_epoch(run)` is called; `on_step(step, loss)` after each step whose loss is read (every step
    on a CPU). Returns the run: its id, history, best epoch (0 if none ran) and that epoch's dev evaluation.
    On CUDA Adam is fused: one kernel per step, which also lets the fp16 scaler skip a step without a host read."""
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=lr,
                                 fused=device.type == "cuda")
    scaler = loss_scaler(device, dtype)
    budget = PieceBudget(micro_batch_tokens)
    generator = torch.Generator().manual_seed(seed)  # the same on every rank: all draw the same global batches
    fast = compiled(model, compile)
    trained = for_all_ranks(fast, device)
    run = {"run_id": uuid.uuid4().hex[:12], "epoch": 0, "history": [], "best_epoch": 0, "best_acc": -1.0,
           "best_state": None, "best_dev": None}
    if resume:
        run = load_run_state(state_path, model, optimizer, scaler, generator, config)
        tqdm.write(f"resuming after epoch {run['epoch']} from {state_path}")
    saved = run["epoch"] if state_path else 0  # the last epoch whose state is on disk
    for epoch in range(run["epoch"] + 1, epochs + 1):
        with stopping_keeps_state(f"during epoch {epoch}", saved, state_path):
            start = time.perf_counter()
            train = train_epoch(trained, data["train"], loss_fn, optimizer, batch_size=batch_size, generator=generator,
                                device=device, dtype=dtype, clip=clip, micro_batch_tokens=budget, scaler=scaler,
                                desc=f"epoch {epoch}/{epochs}", on_step=on_step)
            train = dict(zip(train, all_reduce_sum(list(train.values()))))  # summed over ranks
            seconds = time.perf_counter() - start
            dev = evaluate(fast, data["dev"], loss_fn, batch_size=batch_size, device=device, dtype=dtype)
            run["history"].append(epoch_record(epoch, train, len(data["train"]), seconds, dev))
            print_epoch(run["history"][-1], epochs)
            if dev["acc"] > run["best_acc"]:
                run.update(best_epoch=epoch, best_acc=dev["acc"], best_state=trainable_state(model), best_dev=dev)
            run["epoch"] = epoch
            if state_path:
                rng = rng_states()
                on_main(lambda: save_run_state(state_path, run, model, optimizer, scaler, generator, config, rng))
                saved = epoch
        with stopping_keeps_state(f"after epoch {epoch}", saved, state_path):
            if on_epoch:
                on_epoch(run)
    if run["best_state"] is not None:
        model.load_state_dict(run["best_state"], strict=False)
    return run


# ----------------------------------------------------------------------------- one training run, start to finish

def resume_state_path(out_path):
    return Path(f"{str(out_path).rstrip('/')}.resume.pt")


def majority_accuracy(splits):
    """Dev accuracy of always answering the training set's most common label."""
    majority = majority_label(splits["train"].labels)
    return scores([majority] * len(splits["dev"]), splits["dev"].labels, len(splits.labels))["acc"]


def final_scores(final, splits):
    """Scores of the best epoch's predictions and of the majority baseline on each evaluation split."""
    majority, n = majority_label(splits["train"].labels), len(splits.labels)
    return {"majority": majority,
            "model": {name: scores(final[name]["preds"], splits[name].labels, n) for name in splits.evaluated},
            "baseline": {name: scores([majority] * len(splits[name]), splits[name].labels, n)
                         for name in splits.evaluated}}


def print_run_summary(mode, best_epoch, epochs, s, splits):
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\n{mode}{on}: best epoch {best_epoch} of {epochs} (95% intervals: Wilson for accuracy, bootstrap for "
          f"{'MCC and macro-F1' if len(splits.labels) > 2 else 'MCC'})")
    headers = [h for name in splits.evaluated for h in score_headers(splits.titles[name], len(splits.labels))]
    cells = {who: [c for name in splits.evaluated for c in score_cells(s[who][name])] for who in ("model", "baseline")}
    print(format_table(["", *headers], [[mode, *cells["model"]], ["majority baseline", *cells["baseline"]]]))
    for note in splits.notes:
        print(f"note: {note}")


def run_record(mode, args, device, dtype, splits, model, run, final, s, seconds, plots):
    """The run's line in its log: every flag, per-epoch metrics, the best epoch, predictions, timing."""
    history, best_epoch = run["history"], run["best_epoch"]
    total, trainable = count_parameters(model)
    names = splits.evaluated
    return {"mode": mode, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": flags(args),
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": data_fingerprint(splits),
            "parameters": total, "trainable_parameters": trainable, "history": history, "best_epoch": best_epoch,
            "majority_label": s["majority"], **{f"baseline_{name}_acc": s["baseline"][name]["acc"] for name in names},
            **{f"{name}_{k}": v for name in names for k, v in s["model"][name].items()},
            "dev_sentences_per_s": final["dev"]["sentences_per_s"],
            **{f"{name}_preds": final[name]["preds"] for name in names},
            "wall_seconds": seconds, "plots": plots}


def progress_record(mode, args, device, dtype, data, run):
    """The run's line in tuning/<mode>.jsonl while it trains: rewritten after every epoch and marked unfinished,
    so that a run stopped midway still shows its epochs and a sweep never counts it as done."""
    return {"mode": mode, "run_id": run["run_id"], "finished": False, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "args": flags(args), "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": data,
            "history": run["history"], "best_epoch": run["best_epoch"]}


def draw_history(run, mode, splits, baseline_acc):
    """plots/<mode>_loss.png and _acc.png (<mode>-<dataset>_... past CoLA) for the epochs so far, the best one with
    its 95% Wilson interval."""
    n = len(splits["dev"])
    best_ci = wilson_interval(round(run["best_acc"] * n), n)
    return plot_history(run["history"], mode, splits, baseline_acc, best_ci, PLOTS_DIR)


def train_and_report(mode, model, loss_fn, splits, args, device, dtype, out_path, save, extra=None):
    """Train with the shared loop, evaluate the best epoch on each evaluation split and print the summary. Rank 0
    alone writes: after every epoch the plots and the run's (unfinished) line in its log (tuning/<mode>.jsonl for
    CoLA, tuning/<mode>-<dataset>.jsonl otherwise), at the end the finished line and the model (`save()` to
    `out_path`), then it removes the --resume state. Returns the run's record (None on other ranks)."""
    start, log = time.time(), f"{TUNING_DIR}/{run_stem(mode, splits.spec)}.jsonl"
    state_path = resume_state_path(out_path)
    data, baseline_acc = data_fingerprint(splits), majority_accuracy(splits)
    board = TensorBoardLog.open(args, mode) if is_main() else None

    def after_epoch(run):
        draw_history(run, mode, splits, baseline_acc)
        write_jsonl_record(log, progress_record(mode, args, device, dtype, data, run), key="run_id")
        if board:
            board.epoch(run["history"][-1], args.lr)

    try:
        run = fit(model, loss_fn, splits, epochs=args.epochs, batch_size=args.batch_size, lr=args.lr, device=device,
                  dtype=dtype, seed=args.seed, clip=getattr(args, "clip", None),
                  micro_batch_tokens=args.micro_batch_tokens or default_micro_batch_tokens(
                      device, activation_bytes_per_token(model)),
                  state_path=state_path, resume=args.resume, config=result_flags(args), compile=args.compile,
                  on_step=board.step if board else None, on_epoch=lambda run: on_main(lambda: after_epoch(run)))
    finally:
        if board:
            board.close()
    final = {"dev": run["best_dev"]}  # the best epoch's weights are restored: their dev evaluation is already done
    if "ood" in splits:
        final["ood"] = evaluate(model, splits["ood"], loss_fn, batch_size=args.batch_size, device=device, dtype=dtype)
    s = final_scores(final, splits)
    print_run_summary(mode, run["best_epoch"], args.epochs, s, splits)

    def write_results():
        plots = draw_history(run, mode, splits, baseline_acc)
        record = run_record(mode, args, device, dtype, splits, model, run, final, s, time.time() - start, plots)
        record |= {"run_id": run["run_id"], "finished": True, **(extra or {})}
        write_jsonl_record(log, record, key="run_id")
        print(f"plots: {', '.join(plots)}; run logged to {log}")
        save()
        state_path.unlink(missing_ok=True)
        return record

    return on_main(write_results)


class TensorBoardLog:
    """--tensorboard: each step's training loss; each epoch's train and dev loss, accuracy and MCC, the learning
    rate and tokens/s; the run's flags as hyper-parameters. `tensorboard --logdir runs` compares runs."""

    def __init__(self, log_dir, hyper_parameters):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        self.writer, self.done, self.last = SummaryWriter(log_dir), 0, 0  # steps of earlier epochs, last step seen
        metrics = {"dev/acc": 0.0, "dev/mcc": 0.0, "dev/loss": 0.0}  # HParams reads their values from the scalars
        experiment, start, self.end = hparams(hyper_parameters, metrics)
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)

    @classmethod
    def open(cls, args, mode):
        """The log --tensorboard asks for (its folder, or runs/<mode>-<time>-<process id>), or None."""
        if not getattr(args, "tensorboard", None):
            return None
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # unique among a sweep's runs side by side
        folder = args.tensorboard if args.tensorboard != "auto" else f"runs/{mode}-{stamp}"
        print(f"TensorBoard log: {folder} (view with `tensorboard --logdir {Path(folder).parent}`)")
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flags(args).items()}
        return cls(folder, plain)

    def step(self, step, loss):
        """The loss of `step` of the current epoch (every step on a CPU; on CUDA, each step whose loss is read)."""
        self.last = step
        self.writer.add_scalar("train/step_loss", loss, self.done + step)

    def epoch(self, row, lr):
        for tag, key in (("train/loss", "train_loss"), ("train/acc", "train_acc"), ("dev/loss", "dev_loss"),
                         ("dev/acc", "dev_acc"), ("dev/mcc", "dev_mcc"), ("train/tokens_per_s", "train_tokens_per_s")):
            self.writer.add_scalar(tag, row[key], row["epoch"])
        self.writer.add_scalar("train/lr", lr, row["epoch"])
        self.writer.flush()
        self.done += self.last

    def close(self):
        self.writer.file_writer.add_summary(self.end)
        self.writer.close()


def check_teacher_data(folder, info, splits):
    """A distil teacher must have learnt the dataset and label set its student learns (an adapter from before
    datasets other than CoLA, or from PEFT, is CoLA's). Nothing to check without data (--epochs 0)."""
    if splits is None:
        return
    theirs = (info.get("dataset", "cola"), info.get("dataset_name", "CoLA"), tuple(info.get("labels", LABELS)))
    ours = (splits.spec.slug, splits.spec.name, tuple(splits.labels))
    if (theirs[0], theirs[2]) != (ours[0], ours[2]):
        raise UserError(f"{folder}: the teacher was trained on {theirs[1]} with labels {list(theirs[2])}, not on "
                        f"{ours[1]} with labels {list(ours[2])}; train a teacher on it with `python run.py LoRA`")


# ----------------------------------------------------------------------------- reporting

def report_entry(name, params, speed, preds):
    return {"name": name, "params": params, "speed": speed, **preds}


def print_distil_report(logits, splits, kd_run):
    """Teacher vs student with KD vs student without KD (latest matching `rnn` run) vs majority baseline, every
    number computed from saved predictions, with intervals; McNemar's test pairs the two students (or, without a
    no-KD run, the KD student and the baseline). Also draws plots/summary.png (summary-<dataset>.png)."""
    names, n = splits.evaluated, len(splits.labels)
    labels = {name: splits[name].labels for name in names}
    short = {"dev": "dev", "ood": "ood"} if splits.spec.is_cola else splits.titles
    majority = majority_label(splits["train"].labels)
    entries = [report_entry("teacher (GPT-2 + LoRA)", int(logits["parameters"]),
                            len(splits["dev"]) / float(logits["dev_seconds"]),
                            {k: logits[k].argmax(-1).tolist() for k in names}),
               report_entry("student with KD", kd_run["parameters"], kd_run["dev_sentences_per_s"],
                            {k: kd_run[f"{k}_preds"] for k in names})]
    nokd = latest_matching_rnn_run(kd_run)
    if nokd:
        entries.append(report_entry("student without KD", nokd["parameters"], nokd["dev_sentences_per_s"],
                                    {k: nokd[f"{k}_preds"] for k in names}))
    entries.append(report_entry("majority baseline", 0, 0, {k: [majority] * len(labels[k]) for k in names}))
    rows = []
    for e in entries:
        e["scores"] = scores(e["dev"], labels["dev"], n)
        ood = [score_cells(scores(e["ood"], labels["ood"], n))[0]] if "ood" in names else []
        rows.append([e["name"], f"{e['params'] / 1e6:.2f}M" if e["params"] else "-", *score_cells(e["scores"]),
                     *ood, f"{e['speed']:,.0f}" if e["speed"] else "-"])
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\nDistillation report{on} (95% intervals: Wilson for accuracy, bootstrap for MCC)")
    headers = [f"{short['dev']} {h}" if h == "MCC" else h for h in score_headers(short["dev"], n)]
    print(format_table(["model", "params", *headers, *([f"{short['ood']} acc"] if "ood" in names else []),
                        "sentences/s"], rows))
    print_mcnemar(entries, labels["dev"], short["dev"], None if nokd else rnn_log(kd_run))
    for note in splits.notes:
        print(f"note: {note}")
    print(f"comparison chart: {plot_summary(entries, splits, PLOTS_DIR)}")


def print_mcnemar(entries, labels, title, missing_log):
    """McNemar's exact test of the student with KD against the third entry (without KD, or the baseline)."""
    other = entries[2]
    correct = {e["name"]: torch.tensor(e["dev"]) == labels for e in (entries[1], other)}
    only_kd, only_other, p = mcnemar_exact(correct["student with KD"], correct[other["name"]])
    print(f"McNemar's exact test, student with KD vs {other['name']} on the {len(labels)} {title} sentences: "
          f"{only_kd} right only with KD, {only_other} right only without; p = {p:.3g}")
    if missing_log:
        print(f"(no `run.py rnn` run with the same data, student shape, seed and training flags in {missing_log}: "
              "run it for the without-KD row)")


def rnn_log(run):
    """The log of `run.py rnn` runs on the dataset of `run`."""
    return f"{TUNING_DIR}/{run_stem('rnn', DataSpec.from_args(run['args']))}.jsonl"


def latest_matching_rnn_run(run):
    """The latest `run.py rnn` run on the same data, student shape, seed and training recipe as `run` (a distil
    run), if any: the two then differ by KD alone."""
    same = ("rnn_hidden", "rnn_layers", "rnn_cell", "max_examples", "seed", "lr", "epochs", "batch_size", "clip",
            "dtype")
    matches = [r for r in read_jsonl(rnn_log(run)) if r.get("finished", True) and r["data"] == run["data"]
               and all(r["args"].get(k) == run["args"].get(k) for k in same)]
    return matches[-1] if matches else None


def print_parameter_table(model):
    """The parameter counts, as the seed printed them (a tied weight counted once)."""
    total, trainable = count_parameters(model)
    print(f"Number of parameters: {total / 1e6:.2f}M")
    print(f"Number of trainable parameters: {trainable / 1e6:.2f}M")
    print(f"Reduction: {100 * (1 - trainable / total):.2f}%")


def prediction_rows(sentences, probs, names):
    """One row per sentence and the predicted ids: CoLA's label and p_acceptable, or for other label sets the
    predicted label and its probability `p`."""
    if tuple(names) == LABELS:
        p_acceptable = probs[:, 1].tolist()
        preds = [int(p >= 0.5) for p in p_acceptable]
        return [{"sentence": s, "label": LABELS[y], "p_acceptable": round(p, 6)}
                for s, y, p in zip(sentences, preds, p_acceptable)], preds
    p, preds = probs.max(-1)
    return [{"sentence": s, "label": names[y], "p": round(q, 6)}
            for s, y, q in zip(sentences, preds.tolist(), p.tolist())], preds.tolist()


def print_predictions(sentences, probs, names, labels, fmt):
    """One line per sentence (its label and probability) as a table, jsonl or tsv; with labels (names, None where a
    row has none), then the scores with their intervals beside the majority class (on stderr unless a table)."""
    rows, preds = prediction_rows(sentences, probs, names)
    p_key = next(k for k in rows[0] if k.startswith("p")) if rows else "p"
    if fmt == "jsonl":
        print("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    elif fmt == "tsv":
        print("\n".join(f"{r['label']}\t{r[p_key]:.4f}\t{r['sentence']}" for r in rows))
    else:
        print(format_table(["label", p_key, "sentence"],
                           [[r["label"], f"{r[p_key]:.4f}", r["sentence"]] for r in rows]))
    if labels is not None:
        print_prediction_scores(preds, labels, names, file=sys.stdout if fmt == "table" else sys.stderr)


def print_prediction_scores(preds, labels, names, file):
    """Accuracy and MCC (and macro-F1 past two classes) of the rows that have a label the model knows."""
    unknown = sorted({y for y in labels if y is not None and y not in names})
    if unknown:
        raise UserError(f"the input's label {unknown[0]!r} is not one the model was trained on ({', '.join(names)})")
    rows = [i for i, y in enumerate(labels) if y is not None]
    if not rows:
        print(f"no row has a label: nothing scored ({len(labels)} unlabelled rows)", file=file)
        return
    ids = [names.index(labels[i]) for i in rows]
    s = scores([preds[i] for i in rows], ids, len(names))
    majority = scores([majority_label(ids)] * len(ids), ids)["acc"]
    (acc_low, acc_high), (mcc_low, mcc_high) = s["acc_ci"], s["mcc_ci"]
    f1 = f"  macro-F1 {s['f1']:.3f} [{s['f1_ci'][0]:.2f}, {s['f1_ci'][1]:.2f}]" if "f1" in s else ""
    skipped = f" ({len(labels) - len(rows)} unlabelled rows not scored)" if len(rows) < len(labels) else ""
    print(f"accuracy {s['acc']:.2%}  MCC {s['mcc']:+.3f}{f1}  on {len(ids)} labelled sentences{skipped}; 95% "
          f"intervals: accuracy {acc_low:.1%}-{acc_high:.1%}, MCC {mcc_low:+.2f} to {mcc_high:+.2f}; "
          f"this file's majority class scores {majority:.2%} (MCC 0)", file=file)


def format_table(headers, rows):
    """A plain-text table with right-aligned columns."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_history(history, mode, splits, baseline_acc, best_acc_ci=None, plots_dir="plots"):
    """plots/<mode>_loss.png and plots/<mode>_acc.png (<mode>-<dataset>_... past CoLA): train vs validation per
    epoch, majority baseline drawn, and the best epoch's 95% interval as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    paths = []
    for metric, label in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"dev_{metric}"] for h in history], "s-", label=f"validation ({splits.titles['dev']})")
        if metric == "acc":
            ax.axhline(baseline_acc, color="gray", linestyle="--", label=f"majority baseline ({baseline_acc:.2%})")
            best = max(history, key=lambda h: h["dev_acc"])
            if best_acc_ci:
                low, high = best_acc_ci
                acc = best["dev_acc"]
                ax.errorbar([best["epoch"]], [acc], yerr=[[acc - low], [high - acc]], fmt="none", ecolor="black",
                            capsize=4, label="best epoch, 95% Wilson interval")
            ax.annotate(f"MCC {best['dev_mcc']:+.3f}", (best["epoch"], best["dev_acc"]),
                        textcoords="offset points", xytext=(8, 8), ha="left")
        ax.set(title=f"{mode} on {splits.spec.name}: {label} per epoch", xlabel="epoch", ylabel=label)
        ax.set_xticks(epochs)
        ax.legend()
        path = f"{plots_dir}/{run_stem(mode, splits.spec)}_{metric}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_summary(entries, splits, plots_dir="plots"):
    """plots/summary.png (summary-<dataset>.png past CoLA): accuracy and MCC with 95% intervals per model, and
    parameters and inference speed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [e["name"].replace(" (", "\n(") for e in entries]
    x = torch.arange(len(entries)).float()
    fig, (ax, size) = plt.subplots(1, 2, figsize=(13, 4.5))
    for offset, metric, label in ((-0.2, "acc", "dev accuracy"), (0.2, "mcc", "dev MCC")):
        values = [e["scores"][metric] for e in entries]
        low = [v - e["scores"][f"{metric}_ci"][0] for v, e in zip(values, entries)]
        high = [e["scores"][f"{metric}_ci"][1] - v for v, e in zip(values, entries)]
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=4, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.set(title=f"{splits.spec.name}, {splits.titles['dev']}: accuracy and MCC (95% intervals)",
           ylim=(min(0, ax.get_ylim()[0]), 1))
    ax.legend()
    measured = [i for i, e in enumerate(entries) if e["params"]]
    size.bar(x[measured], [entries[i]["params"] / 1e6 for i in measured], color="tab:gray", label="parameters (M)")
    size.set(yscale="log", ylabel="parameters (millions)", title="size and inference speed")
    size.set_xticks(x, names, fontsize=8)
    speed = size.twinx()
    speed.plot(x[measured], [entries[i]["speed"] for i in measured], "o-", color="tab:red")
    speed.set(yscale="log", ylabel="sentences / s (dev set, this machine)")
    speed.yaxis.label.set_color("tab:red")
    path = f"{plots_dir}/{run_stem('summary', splits.spec)}.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_grid(labels, configs, baseline_acc, path):
    """A sweep: dev accuracy and MCC per configuration, mean with error bars of one standard deviation over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc, mcc) = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(configs)), 7), sharex=True)
    x = list(range(len(configs)))
    acc.errorbar(x, [c["dev_acc"][0] for c in configs], yerr=[c["dev_acc"][1] for c in configs], fmt="o", capsize=4)
    acc.axhline(baseline_acc, color="gray", linestyle="--", label=f"majority baseline ({baseline_acc:.2%})")
    acc.set(ylabel="dev accuracy", title="sweep: mean ± std over seeds")
    acc.legend()
    mcc.errorbar(x, [c["dev_mcc"][0] for c in configs], yerr=[c["dev_mcc"][1] for c in configs], fmt="s",
                 color="tab:orange", capsize=4)
    mcc.axhline(0, color="gray", linestyle="--")
    mcc.set(ylabel="dev MCC")
    mcc.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path
