"""What `LoRA --task lm` trains on, nanoGPT's way and PEFT's: plain text joined with <|endoftext|> and cut into
blocks (every token a target), or prompt -> completion pairs, each `prompt + SEPARATOR + completion +
<|endoftext|>`, whose prompt tokens are inputs only (the completion's tokens and the end are the targets)."""
from pathlib import Path

import torch

from model import EOT
from runtime.distributed import main_first
from textdata.batches import IGNORE, Split, Splits
from textdata.readers import (DATA_FILE_TYPES, DataSpec, TextData, checked_texts, load_dataset_dict, pick, split_names,
                              split_where, text_lines)
from utils import UserError

# Between a prompt and its completion: a newline, one token (198) whatever surrounds it, since the two are tokenized
# apart. GPT-2 read newlines as the end of a line of text, so a completion starts as a new line would; E2E's
# meaning representations and references hold none, so the boundary is never ambiguous.
SEPARATOR = "\n"

# A single .txt file is split as nanoGPT splits Shakespeare: the first 90% trains, the rest is the validation set.
TRAIN_FRACTION = 0.9

SPLIT_NAMES = {"train": ("train",), "dev": ("validation", "dev"), "ood": ("test",)}
LM_TITLES = {"dev": "validation", "ood": "test"}


class DataError(UserError):
    """Language-model data that cannot be trained on as asked (a missing column, an empty completion): the input
    the command names is wrong, a usage error."""
    exit_code = 2


def prompt_tokens(tokenizer, prompt):
    """The tokens a completion follows: the prompt's, then the separator's, tokenized apart (as in training)."""
    return tokenizer.encode_ordinary(prompt) + tokenizer.encode_ordinary(SEPARATOR)


def completion_example(tokenizer, prompt, completion):
    """(inputs, targets) of one pair: the next token is the target at every position that predicts a completion
    token or the end; the positions inside the prompt have none (IGNORE)."""
    context = prompt_tokens(tokenizer, prompt)
    answer = tokenizer.encode_ordinary(completion) + [EOT]
    sequence = context + answer
    return sequence[:-1], [IGNORE] * (len(context) - 1) + answer


def text_blocks(tokenizer, documents, block_size):
    """(inputs, targets) blocks of `block_size` tokens of the documents, each followed by <|endoftext|>, one stream
    cut end to end; the targets are the inputs one token on, and the last block may be shorter."""
    stream = [t for doc in documents for t in tokenizer.encode_ordinary(doc) + [EOT]]
    starts = range(0, len(stream) - 1, block_size)
    return [(stream[i:i + n], stream[i + 1:i + 1 + n]) for i in starts for n in [min(block_size, len(stream) - 1 - i)]]


def lm_split(examples):
    """A Split of (inputs, targets) examples; they carry no class label (-1)."""
    return Split([x for x, _ in examples], torch.full((len(examples),), -1), targets=[y for _, y in examples])


def read_text_files(path):
    """{split: [document]} of a .txt file (cut at the line nearest 90% into train and validation) or of a folder
    of train.txt, validation.txt (or dev.txt) and test.txt, each file one document."""
    if path.is_file():
        text = read_utf8(path)
        if no_text(text):
            raise DataError(f"--dataset {path}: {no_text(text)}")
        lines = text_lines(text)
        if len(lines) < 2:
            raise DataError(f"--dataset {path}: one line only; a single text file is split into train and "
                            "validation at a line (or give a folder of train.txt and validation.txt)")
        cut = min(len(lines) - 1, max(1, round(TRAIN_FRACTION * len(lines))))  # a line at least in each part
        parts = {"train": "\n".join(lines[:cut]) + "\n", "dev": "\n".join(lines[cut:]) + "\n"}
        blank = next((key for key, part in parts.items() if no_text(part)), None)
        if blank:
            first, last = (1, cut) if blank == "train" else (cut + 1, len(lines))
            where = f"line {first}" if first == last else f"lines {first}-{last}"
            raise DataError(f"--dataset {path}: its {LM_TITLES.get(blank, blank)} part ({where}: the file is cut at "
                            f"{TRAIN_FRACTION:.0%}) {no_text(parts[blank])}")
        return {key: [part] for key, part in parts.items()}
    files = {p.stem: p for p in sorted(path.glob("*.txt"))}
    found = {key: next((files[n] for n in names if n in files), None) for key, names in SPLIT_NAMES.items()}
    missing = [key for key in ("train", "dev") if found[key] is None]
    if missing:
        raise DataError(f"--dataset {path}: no {' or '.join(n + '.txt' for n in SPLIT_NAMES[missing[0]])}")
    texts = {key: read_utf8(p) for key, p in found.items() if p is not None}
    blank = next((key for key, text in texts.items() if no_text(text)), None)
    if blank:
        raise DataError(f"{found[blank]}: {no_text(texts[blank])}")
    return {key: [text] for key, text in texts.items()}


def no_text(text):
    """What is wrong with a text to train a language model on that holds nothing to learn, or None."""
    if not text:
        return "empty"
    return "holds no text, only spaces and blank lines" if text.isspace() else None


def read_utf8(path):
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DataError(f"{path}: not UTF-8 text (byte {e.start})") from None


def text_files(spec):
    """The .txt file or folder of .txt files `spec` names, or None for a dataset `datasets` reads."""
    path = Path(spec.dataset)
    if path.suffix == ".txt" or (path.is_dir() and any(path.glob("*.txt")) and not any(
            p.suffix in DATA_FILE_TYPES for p in path.iterdir())):
        if not path.exists():
            raise DataError(f"--dataset {path}: no such file")
        return path
    return None


def read_columns(spec, columns):
    """{split: {column: [cell]}} of a dataset's train, validation and (if any) test splits. `columns` maps each
    role ("text", or "prompt" and "completion") to (the flag's value, its flag, default names)."""
    dd = load_dataset_dict(spec)
    names = split_names(spec, dd)
    out = {}
    for key, split in names.items():
        if split is None:
            continue
        part, where = dd[split], split_where(spec, split)
        try:
            chosen = {role: pick(part.column_names, wanted, defaults, "column", flag)
                      for role, (wanted, flag, defaults) in columns.items()}
        except UserError as e:
            raise DataError(f"{where}: {e}") from None
        out[key] = {role: checked_texts(part[column], where, column, role, DataError)
                    for role, column in chosen.items()}
    return out


def read_lm_data(spec, prompt_column=None, completion_column=None):
    """{split: ...} of the dataset: {split: (prompts, completions)} when the two columns are given, else
    {split: [document]} (a .txt file or folder, or the text column of any dataset)."""
    if prompt_column:
        columns = {"prompt": (prompt_column, "prompt_column", ()),
                   "completion": (completion_column, "completion_column", ())}
        return {key: (c["prompt"], c["completion"]) for key, c in read_columns(spec, columns).items()}
    path = text_files(spec)
    if path is not None:
        return read_text_files(path)
    columns = {"text": (spec.text_column, "text_column", ("text", "sentence"))}
    return {key: c["text"] for key, c in read_columns(spec, columns).items()}


def load_lm_splits(spec: DataSpec, tokenizer, *, block_size, prompt_column=None, completion_column=None,
                   max_examples=None, seed=0):
    """Tokenized splits {'train', 'dev'[, 'ood']} for a language model: text blocks of `block_size`, or one example
    per pair (pairs longer than `block_size` are left out, and said so). `max_examples` takes a seeded random
    subset of the training examples."""
    with main_first():  # one download, not one per rank
        raw = read_lm_data(spec, prompt_column, completion_column)
    splits = Splits(spec, TextData({}, (), {k: v for k, v in LM_TITLES.items() if k in raw}))
    splits.task = "lm"
    for key, texts in raw.items():
        if prompt_column:
            examples = [completion_example(tokenizer, p, c) for p, c in zip(*texts)]
            kept = [e for e in examples if len(e[0]) <= block_size]
            if examples and not kept:
                shortest = min(len(x) for x, _ in examples)
                raise DataError(f"{spec.name}: all {len(examples)} pairs of the {LM_TITLES.get(key, key)} split are "
                                f"longer than --block_size {block_size} tokens (the shortest has {shortest}); give a "
                                "larger --block_size")
            if len(kept) < len(examples):
                splits.notes.append(f"{len(examples) - len(kept)} pairs of {key} longer than --block_size "
                                    f"{block_size} tokens left out")
            examples = kept
        else:
            examples = text_blocks(tokenizer, texts, block_size)
        if not examples:
            raise DataError(f"{spec.name}: the {key} split holds no text to train on")
        splits[key] = lm_split(examples)
    if max_examples:
        keep = torch.randperm(len(splits["train"]), generator=torch.Generator().manual_seed(seed))[:max_examples]
        splits["train"] = splits["train"].subset(keep.tolist())
    return splits
