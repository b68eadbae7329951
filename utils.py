"""Everything around the models: errors, seeding, devices, tokenizer, CoLA and other datasets, atomic files,
checkpoints."""
import argparse
import codecs
import contextlib
import csv
import functools
import hashlib
import io
import json
import os
import random
import signal
import stat
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
import zipfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

COLA_URL = "https://nyu-mll.github.io/CoLA/cola_public_1.1.zip"
COLA_SPLITS = {"train": "in_domain_train.tsv", "dev": "in_domain_dev.tsv", "ood": "out_of_domain_dev.tsv"}
EOT = 50256  # <|endoftext|>: GPT-2's end-of-text token, also used as padding (never attended to, see model.py)
LABELS = ("unacceptable", "acceptable")  # CoLA's labels 0 and 1


class UserError(Exception):
    """A failure the user can fix; run.py prints its message as one line and exits 1."""


# ----------------------------------------------------------------------------- signals

class Terminated(KeyboardInterrupt):
    """SIGTERM, which SLURM, Kubernetes, `timeout` and systemd send before killing: raised like Ctrl-C's
    KeyboardInterrupt, so that a run stops the same way (resume state kept, one line), with exit code 143."""
    exit_code = 143


def interrupt_exit_code(interrupt):
    return getattr(interrupt, "exit_code", 130)  # 128 + SIGINT


@contextlib.contextmanager
def sigterm_as_interrupt():
    """Within the block, SIGTERM raises Terminated; a second SIGTERM then ends the process at once."""
    def handler(signum, frame):
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        raise Terminated()

    if threading.current_thread() is not threading.main_thread():  # only the main thread may set handlers
        yield
        return
    previous = signal.signal(signal.SIGTERM, handler)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# ----------------------------------------------------------------------------- seeding and devices

def seed_everything(seed):
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def resolve_device(name):
    """`--device` as a torch.device: auto is CUDA if present, else an Apple GPU (MPS) if present, else the CPU."""
    if name == "auto":
        if torch.cuda.is_available():
            return torch.device(f"cuda:{torch.cuda.current_device()}")
        return torch.device("mps" if torch.backends.mps.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    if name == "mps" and not torch.backends.mps.is_available():
        raise UserError("--device mps: no Apple GPU (MPS) is available here (use --device cpu)")
    try:
        device = torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1, mps)") from None
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise UserError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                        f"cuda:0 to cuda:{torch.cuda.device_count() - 1}")
    return device


def has_fast_bf16(device):
    """True where bf16 matmuls beat fp32: a GPU that runs bf16 natively (compute capability 8.0 and up: A100, H100,
    RTX 30xx and later; every ROCm GPU), or a CPU with AMX / AVX512-BF16. A T4 or V100 only emulates bf16, slower
    than fp32. Not `torch.cuda.is_bf16_supported()`: it answers for the current GPU, not `device`, and True on a T4
    unless emulation is excluded."""
    if device.type == "cuda":
        return bool(torch.version.hip) or torch.cuda.get_device_properties(device).major >= 8
    # Not mkldnn's bf16 support: it is true on any AVX512 CPU, where oneDNN emulates bf16 about 3x slower than fp32.
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def auto_dtype(device, training, decoding=None):
    """What `--dtype auto` runs, the one place that decides it. CUDA: bf16 where it is native, else fp16 on tensor
    cores (capability 7.x: T4, V100; training then scales the loss), else fp32. Apple's MPS: fp16 to decode and
    classify, fp32 to train (no loss scaling there yet). CPU: bf16 where it is fast, else fp32, but to decode (the
    DecodingWork `decoding`) whichever of the two decode_dtype measures faster for that work."""
    if device.type == "cuda":
        if has_fast_bf16(device):
            return torch.bfloat16
        return torch.float16 if torch.cuda.get_device_capability(device) >= (7, 0) else torch.float32
    if device.type == "mps":
        return torch.float32 if training else torch.float16
    if decoding:
        return decode_dtype("cpu", decoding)
    return torch.bfloat16 if has_fast_bf16(device) else torch.float32


def column_major(weight):
    """The same matrix stored transposed in memory (strides (1, rows)): a product with one row then runs through
    the matrix as x @ W^T with W^T contiguous."""
    return weight.t().contiguous().t()


def seconds(product, *args):
    start = time.perf_counter()
    product(*args)
    return time.perf_counter() - start


def product_seconds(x, weight):
    return seconds(torch.nn.functional.linear, x, weight)


def faster_one_row_layout(weight, pairs=3):
    """`weight` as it is (row-major) or column-major, whichever one row multiplies faster on this CPU: the median
    time ratio of `pairs` products with each decides (a few milliseconds for GPT-2's head).

    Which wins depends on the CPU and the dtype: for GPT-2's 50257x768 head on a Cascade Lake Xeon, column-major
    is 1.1x faster in fp32 and 1.7x in bf16 (measured). In fp16 column-major products fall back to a path 25x
    slower, so only fp32 and bf16 are tried.
    """
    if weight.dtype not in (torch.float32, torch.bfloat16):
        return weight
    candidates = (weight, column_major(weight))
    x = torch.ones(1, weight.size(1), dtype=weight.dtype, device=weight.device)
    for w in candidates:
        torch.nn.functional.linear(x, w)  # the first product of a layout sets up its kernel: not timed
    ratios = [product_seconds(x, candidates[1]) / product_seconds(x, candidates[0]) for _ in range(pairs)]
    return candidates[1] if statistics.median(ratios) < 1 else candidates[0]


@dataclass(frozen=True)
class DecodingWork:
    """What `gen` decodes, for decode_dtype: samples decoding together, the prompt's tokens (read once, shared by
    the samples), the new tokens per sample, whether the weights are int8 (--quantize int8), and the model's
    context window (1024 tokens for every GPT-2)."""
    rows: int = 1
    prompt_tokens: int = 1
    new_tokens: int = 100
    int8: bool = False
    window: int = 1024

    def token_reads(self):
        """(one-row steps per sample, tokens read as a prompt is): the prompt's last `window` tokens once, then one
        step per new token while the cache has room; past the window each new token of each sample re-reads the
        whole window (see GPT.generate_batch)."""
        read = min(self.prompt_tokens, self.window)
        steps = min(self.new_tokens, self.window - read + 1)
        return steps, read + (self.new_tokens - steps) * self.rows * self.window


@functools.cache
def decode_dtype(device_type, work=DecodingWork(), budget_s=0.05, most_prompt_rows=32):
    """float32 or bfloat16, whichever does this decoding `work` faster on this machine, measured once per process
    (0.15-0.3 s on a 2-core Xeon).

    Decoding is products of the weights by a few rows, bound by how fast the weights stream from memory; whether
    bf16's half-size weights stream faster depends on the CPU (much faster on an AMD EPYC with AVX512-BF16; on a
    Cascade Lake Xeon, which emulates bf16, a block's products barely, the head 1.7x), so no CPU flag decides.
    Reading the prompt is the opposite, bound by arithmetic, which that Xeon does about 5x slower in bf16. So the
    products of the whole work (decoding_products) are timed in fp32/bf16 pairs for `budget_s` seconds, three pairs
    at least, each weighed by its share of gpt2 (12 blocks, the whole head) and by the steps and prompt tokens of
    the work (DecodingWork.token_reads). bf16 must be 5% faster by the median ratio: the rest of a step (norms,
    casts) costs a little more in bf16, and a tie goes to fp32, which is exact. On that Xeon one row's weighed
    products are 1.2x faster in bf16 (ratio 0.83-0.84; whole steps 1.13x), and for 8 rows fp32's packed products
    win (ratio 2.55). Since the samples count, sample i of several is the text it would be alone only if both run in
    the same dtype. CUDA takes bf16 where it has it.

    int8 work is fp32, unmeasured: its products run on int8 weights in either dtype, which would only change the
    rest of the model (norms, attention, the residual stream). In fp32 that rest is exact, so the only error is the
    int8 products' (as the README measures it), and it was as fast as in bf16 on that Xeon (an int8 step 32.7
    against 32.3 ms, alternating).
    """
    if device_type != "cpu":
        return auto_dtype(torch.device(device_type), training=False)
    if work.int8:
        return torch.float32
    prompt_rows = min(work.prompt_tokens, work.window, most_prompt_rows)
    products = decoding_products(work.rows, prompt_rows)
    steps, prompt_tokens = work.token_reads()
    blocks, head_slices = 12 * 9216 / 8448, 50257 / 8192  # gpt2: 12 blocks of 9216 x 768, a 50257-row head

    def work_seconds(block, heads, prompt):
        return (steps * (blocks * sum(map(seconds, block)) + head_slices * min(map(seconds, heads)))
                + prompt_tokens / prompt_rows * blocks * sum(map(seconds, prompt)))

    ratios, stop = [], time.perf_counter() + budget_s
    while time.perf_counter() < stop or len(ratios) < 3:
        fp32 = work_seconds(*products[torch.float32])
        ratios.append(work_seconds(*products[torch.bfloat16]) / fp32)
    return torch.bfloat16 if statistics.median(ratios) < 0.95 else torch.float32


def decoding_products(rows, prompt_rows):
    """{dtype: (a step's block products, its head products, the prompt's block products)} in fp32 and bf16, for
    decode_dtype to time: a GPT-2 block's three largest weights and an 8192-row slice of a head by `rows` rows, as
    decoding runs them (one row: the head in both layouts, the faster one counts; several rows in fp32: MKL's
    packed weights, see model.PackedLinear), and the block's weights by `prompt_rows` rows. The two dtypes together
    hold more than a 36 MB cache, so one-row products stream from memory as in decoding. Each product has run once:
    the first of a kind sets up its kernel."""
    products = {}
    for dtype in (torch.float32, torch.bfloat16):  # the values do not matter to the time
        block = [torch.ones(shape, dtype=dtype) for shape in [(2304, 768), (3072, 768), (768, 3072)]]
        packed = rows > 1 and dtype == torch.float32 and torch.backends.mkl.is_available()
        heads = [torch.ones(8192, 768, dtype=dtype)] + ([] if packed else [torch.ones(768, 8192, dtype=dtype).T])
        products[dtype] = (product_functions(rows, block, packed), product_functions(rows, heads, packed),
                           product_functions(prompt_rows, block))
        for product in [p for kind in products[dtype] for p in kind]:
            product()
    return products


def product_functions(rows, weights, packed=False):
    """Functions of no arguments, each the product of `rows` rows by one of `weights` (as decoding runs it: through
    MKL's packed weights if `packed`, see model.PackedLinear); for decode_dtype, the values do not matter."""
    x = {n: torch.ones(rows, n, dtype=weights[0].dtype) for n in {w.size(1) for w in weights}}
    if packed:
        return [functools.partial(torch.ops.mkl._mkl_linear, x[w.size(1)],
                                  torch.ops.mkl._mkl_reorder_linear_weight(w, rows), w, None, rows) for w in weights]
    return [functools.partial(torch.nn.functional.linear, x[w.size(1)], w) for w in weights]


def compute_dtype(flag, device, training=False, decoding=None):
    """The dtype that `--dtype` asks for: for training, for token-by-token decoding (gen: `decoding` is its
    DecodingWork), or for prediction."""
    if flag == "auto":
        return auto_dtype(device, training, decoding)
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]


def loss_scaler(device, dtype):
    """fp16 gradients underflow: scale the loss up before backward and the gradients down before the step, skipping
    a step whose gradients overflowed (PyTorch's GradScaler). bf16 and fp32 need none: a disabled scaler passes
    everything through."""
    return torch.amp.GradScaler(device.type, enabled=dtype == torch.float16)


def default_micro_batch_tokens(device, bytes_per_token=None):
    """Padded tokens per piece of a batch. CPU: 512 (as fast as larger pieces there, and keeps a gpt2-medium run
    under 3 GB). CUDA: what half the free memory holds at `bytes_per_token` of activations (an estimate; a piece
    that still runs out of memory is halved), a power of two from 256 to 65536."""
    if device.type != "cuda" or not bytes_per_token:
        return 512
    free, _ = torch.cuda.mem_get_info(device)
    tokens = max(256, min(65536, free // 2 // bytes_per_token))
    return 1 << (int(tokens).bit_length() - 1)


def compiled(model, on):
    """`torch.compile(model)` for --compile, else the model itself."""
    return torch.compile(model) if on else model


# ----------------------------------------------------------------------------- several processes (torchrun)

def init_distributed():
    """Join the process group torchrun describes in the environment (NCCL for CUDA tensors, gloo for CPU); a plain
    `python run.py` has no WORLD_SIZE and stays a single process with no group at all."""
    import torch.distributed as dist
    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not dist.is_initialized():
        use_cuda = torch.cuda.is_available()
        if use_cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("cpu:gloo,cuda:nccl" if use_cuda else "gloo")  # small CPU reductions use gloo


def rank():
    import torch.distributed as dist
    return dist.get_rank() if dist.is_initialized() else 0


def world_size():
    import torch.distributed as dist
    return dist.get_world_size() if dist.is_initialized() else 1


def is_main():
    return rank() == 0


def barrier():
    import torch.distributed as dist
    if dist.is_initialized():
        dist.barrier()


@contextlib.contextmanager
def main_first():
    """Rank 0 runs the block first (a download, a cache write); the other ranks run it once it has finished."""
    if not is_main():
        barrier()
    try:
        yield
    finally:
        if is_main():
            barrier()


def everyone(flag):
    """True when `flag` is true on every rank (the flag itself in a single process)."""
    return all_reduce_sum([0.0 if flag else 1.0])[0] == 0


def on_main(fn):
    """Run `fn` on rank 0 alone (writing results), then tell every rank whether it worked: if it failed there, the
    other ranks stop too instead of waiting at the next collective until torchrun's timeout. Returns fn's result
    (None on the other ranks)."""
    result, error = None, None
    if is_main():
        try:
            result = fn()
        except BaseException as e:  # an interrupt too: the other ranks must not be left waiting
            error = e
    if not everyone(error is None):
        raise error if error is not None else UserError(f"rank {rank()}: stopping, rank 0 failed (its line says why)")
    return result


def broadcast_from_main(obj):
    """Rank 0's `obj` on every rank (`obj` itself in a single process)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_reduce_sum(values):
    """Sum a list of numbers over all ranks (the identity in a single process)."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return values
    t = torch.tensor(values, dtype=torch.float64)
    dist.all_reduce(t)
    return t.tolist()


# ----------------------------------------------------------------------------- tokenizer

def get_tokenizer():
    import tiktoken
    try:
        return tiktoken.get_encoding("gpt2")
    except Exception as e:  # tiktoken downloads its BPE files on first use
        raise UserError(f"could not load the GPT-2 tokenizer ({type(e).__name__}): tiktoken downloads it once "
                        "and needs internet for that, or TIKTOKEN_CACHE_DIR pointing at a folder holding it") from e


def encode(tokenizer, sentences):
    return [tokenizer.encode_ordinary(s) for s in sentences]


def print_stream(tokenizer, prompt, token_ids, eos_id, stream):
    """Print the prompt, then each token as it arrives (bytes decoded incrementally: a character may span tokens),
    up to `eos_id` (None: print <|endoftext|> like any other token)."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [prompt]
    if stream:
        print(prompt, end="", flush=True)
    for tok in token_ids:
        if tok == eos_id:
            break
        text = decoder.decode(tokenizer.decode_single_token_bytes(tok))
        pieces.append(text)
        if stream:
            print(text, end="", flush=True)
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1] if stream else "".join(pieces), flush=True)


def print_samples(tokenizer, prompt, steps, n_samples, eos_id, stream):
    """Print samples decoded together: `steps` yields one token per sample per step (None for a sample that has
    ended). Sample 1 streams as it is generated; the others, which advance at the same pace, are printed when every
    sample has finished."""
    samples = [[] for _ in range(n_samples)]

    def record(step):
        for sample, tok in zip(samples, step):
            if tok is not None:
                sample.append(tok)

    def first_sample():
        for step in steps:
            record(step)
            if step[0] is not None:
                yield step[0]

    if n_samples > 1:
        print("\n===== sample 1 =====")
    print_stream(tokenizer, prompt, first_sample(), eos_id=eos_id, stream=stream)
    for step in steps:  # sample 1 may end before the others
        record(step)
    for i, sample in enumerate(samples[1:], start=2):
        print(f"\n===== sample {i} =====")
        print_stream(tokenizer, prompt, iter(sample), eos_id=eos_id, stream=False)


# ----------------------------------------------------------------------------- atomic files

def current_umask():
    """The process's umask (Python has no getter: set it and put it back)."""
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def mode_for(path):
    """The mode a plain open(path, "w") would leave: an existing file keeps its own, a new one gets 0o666 & ~umask."""
    try:
        return stat.S_IMODE(os.stat(path).st_mode)
    except FileNotFoundError:
        return 0o666 & ~current_umask()


@contextlib.contextmanager
def atomic_path(path):
    """Yield a temporary path beside `path`; it replaces `path` only if the block finishes. The result has the
    mode open() would give it (mkstemp makes its files private, 0o600). A symbolic link is written through: its
    target is replaced, and the link stays."""
    path = Path(path).resolve()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        yield tmp
        os.chmod(tmp, mode_for(path))
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


@contextlib.contextmanager
def atomic_files(folder, names):
    """Yield {name: temporary path} inside `folder` (created if missing). Once the block finishes, every file is
    complete, and only then does each temporary replace its name; if the block fails, the previous files stay as
    they were. Nothing else in the folder is touched: it may hold the user's own files."""
    with contextlib.ExitStack() as stack:
        yield {name: stack.enter_context(atomic_path(Path(folder) / name)) for name in names}


def write_text(path, text):
    with atomic_path(path) as tmp:
        Path(tmp).write_text(text, encoding="utf-8")


def write_jsonl_record(path, record, key=None):
    """Add `record` as one JSON line to `path`, replacing the line whose `key` field has the same value if there is
    one. The file is rewritten atomically (a crash never leaves half a line) under a lock on its folder, so that
    runs side by side (tune --parallel) never lose each other's lines; the lock leaves no file behind."""
    import fcntl
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
        if key is not None:
            lines = [line for line in lines if (json_record(line) or {}).get(key) != record[key]]
        write_text(path, "".join(line + "\n" for line in lines) + json.dumps(record) + "\n")
    finally:
        os.close(fd)  # releases the lock


def read_jsonl(path):
    """The records of a JSONL log. A line that is not a JSON object (a log edited by hand, or cut short by a full
    disk) is skipped with a warning, so that one bad line does not stop every later run."""
    if not Path(path).exists():
        return []
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        record = json_record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            print(f"warning: {path}:{number}: not a JSON record, ignored", file=sys.stderr)
    return records


def json_record(line):
    """The JSON object on `line`, or None if it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def writable(path):
    """True if `path` can be created or replaced: its nearest existing ancestor is a writable folder (or it is
    itself an existing writable file)."""
    path = Path(path).absolute()
    first = path
    while not path.exists():
        path = path.parent
    if path.is_dir():
        return os.access(path, os.W_OK)
    return path == first and os.access(path.parent, os.W_OK)


def file_sha256(*paths):
    h = hashlib.sha256()
    for p in paths:
        h.update(Path(p).read_bytes())
    return h.hexdigest()


# ----------------------------------------------------------------------------- CoLA

def default_cola_dir():
    return os.environ.get("COLA_DATA_DIR", "data/cola")


def download(url, dest):
    """Download `url` to `dest` atomically with a progress bar."""
    try:
        with urllib.request.urlopen(url, timeout=60) as response, atomic_path(dest) as tmp:
            total = int(response.headers.get("Content-Length", 0)) or None
            with open(tmp, "wb") as f, tqdm(total=total, unit="B", unit_scale=True, desc=Path(dest).name) as bar:
                while chunk := response.read(1 << 16):
                    f.write(chunk)
                    bar.update(len(chunk))
    except OSError as e:
        raise UserError(f"could not download {url} ({e}); download it by hand or point --data_dir at a folder "
                        f"holding {', '.join(COLA_SPLITS.values())}") from e


def ensure_cola(data_dir):
    """Make sure the three raw CoLA TSVs are in `data_dir`, downloading the public release when they are not.
    Folders made for the download are removed again if it fails (only if still empty)."""
    data_dir = Path(data_dir)
    if all((data_dir / name).exists() for name in COLA_SPLITS.values()):
        return data_dir
    made = [p for p in [data_dir, *data_dir.parents] if not p.exists()]
    try:
        data_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UserError(f"--data_dir {data_dir}: cannot create it ({e.strerror})") from None
    zip_path = data_dir / "cola_public_1.1.zip"
    try:
        download(COLA_URL, zip_path)
    except BaseException:
        for folder in made:  # innermost first
            with contextlib.suppress(OSError):
                folder.rmdir()
        raise
    with zipfile.ZipFile(zip_path) as z:
        for name in COLA_SPLITS.values():
            with atomic_path(data_dir / name) as tmp, open(tmp, "wb") as f:
                f.write(z.read(f"cola_public/raw/{name}"))
    zip_path.unlink()
    return data_dir


def read_cola_tsv(path):
    """Read one raw CoLA file (source, label, original mark, sentence) into (sentences, labels).

    Sentences hold quotes, so fields are split on tabs only (QUOTE_NONE), never CSV-unquoted.
    """
    raw = Path(path).read_bytes()
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        line = raw[:e.start].count(b"\n") + 1
        raise UserError(f"{path}:{line}: not UTF-8 text") from None
    sentences, labels = [], []
    rows = csv.reader(io.StringIO(text, newline=None), delimiter="\t", quoting=csv.QUOTE_NONE)
    for line_no, row in enumerate(rows, start=1):
        if not row or row == [""]:
            continue
        if len(row) != 4:
            raise UserError(f"{path}:{line_no}: expected 4 tab-separated columns, found {len(row)}")
        if row[1] not in ("0", "1"):
            raise UserError(f"{path}:{line_no}: label must be 0 or 1, found {row[1]!r}")
        if not row[3].strip():
            raise UserError(f"{path}:{line_no}: the sentence is empty")
        sentences.append(row[3])
        labels.append(int(row[1]))
    if not sentences:
        raise UserError(f"{path}: no rows")
    return sentences, labels


def load_cola(data_dir):
    """{'train'|'dev'|'ood': (sentences, labels)} from the raw release in `data_dir`."""
    data_dir = ensure_cola(data_dir)
    return {split: read_cola_tsv(data_dir / name) for split, name in COLA_SPLITS.items()}


# ----------------------------------------------------------------------------- any dataset `datasets` can load

DATA_FILE_TYPES = {".csv": "csv", ".tsv": "csv", ".json": "json", ".jsonl": "json", ".parquet": "parquet"}
TEXT_COLUMNS, LABEL_COLUMNS = ("sentence", "text"), ("label", "labels")
COLA_TITLES = {"dev": "in-domain dev", "ood": "out-of-domain"}


@dataclass(frozen=True)
class DataSpec:
    """Which data a run reads: `cola` (the raw TSVs in data_dir), a Hugging Face hub id, or a local folder; the
    columns and splits default to the usual names."""
    dataset: str = "cola"
    dataset_config: str = None
    data_dir: str = None
    text_column: str = None
    label_column: str = None
    train_split: str = "train"
    eval_split: str = None
    test_split: str = None

    @classmethod
    def from_args(cls, args):
        """From parsed flags, or the flags a run logged (a dict; runs from before --dataset are CoLA's)."""
        values = args if isinstance(args, dict) else vars(args)
        return cls(**{f.name: values[f.name] for f in fields(cls) if values.get(f.name) is not None})

    @property
    def is_cola(self):
        return self.dataset == "cola"

    @property
    def name(self):
        """How reports name the dataset: 'CoLA', 'nyu-mll/glue (sst2)', a folder's path."""
        return "CoLA" if self.is_cola else self.dataset + (f" ({self.dataset_config})" if self.dataset_config else "")

    def ignored_flag(self):
        """What is wrong with a flag this dataset would ignore, or None: CoLA's files have fixed splits and columns,
        and only a dataset from the hub has configurations."""
        if self.is_cola:
            given = [f.name for f in fields(self) if f.name not in ("dataset", "data_dir")
                     and getattr(self, f.name) != f.default]
            if given:
                return (f"--{given[0]} {getattr(self, given[0])}: CoLA's files have fixed splits and columns (it "
                        "applies to a --dataset from the hub or a folder)")
        elif self.dataset_config and Path(self.dataset).is_dir():
            return (f"--dataset_config {self.dataset_config}: a local folder has no configurations (only a dataset "
                    "from the hub has)")
        return None

    @property
    def slug(self):
        """How file names carry the dataset: 'cola', 'nyu-mll_glue-sst2', a local folder's own name."""
        base = Path(self.dataset).name if Path(self.dataset).is_dir() else self.dataset
        return safe_name(base + (f"-{self.dataset_config}" if self.dataset_config else ""))


@dataclass
class TextData:
    """Sentences and label ids per split ({'train', 'dev'[, 'ood']}), the label names, what each evaluation split
    is called in reports, and notes for the summary (rows left out, a missing second evaluation)."""
    splits: dict
    labels: tuple
    titles: dict
    notes: list = field(default_factory=list)


def safe_name(text, most=100):
    """`text` with every character other than letters, digits, '.', '_' and '-' made '_'; past `most` characters
    cut, and ended with a hash of the whole, so that it stays a valid file name and tells texts apart."""
    name = "".join(c if c.isalnum() or c in "._-" else "_" for c in text)
    return name if len(name) <= most else f"{name[:most - 17]}-{hashlib.sha256(text.encode()).hexdigest()[:16]}"


def local_data_files(folder):
    """{split: [file]} of a folder of train.*, validation.* (or dev.*), test.* ... files, and their suffix."""
    files = {}
    for path in sorted(Path(folder).iterdir()):
        if path.suffix in DATA_FILE_TYPES:
            files.setdefault(path.stem, []).append(str(path))
    suffixes = {Path(f).suffix for paths in files.values() for f in paths}
    if len(suffixes) != 1:
        found = "no" if not suffixes else "mixed (" + ", ".join(sorted(suffixes)) + ")"
        raise UserError(f"--dataset {folder}: {found} data files; expected train.*, validation.* (or dev.*) and "
                        "optionally test.*, all csv, tsv, json, jsonl or parquet, or a DatasetDict.save_to_disk folder")
    return files, suffixes.pop()


def load_dataset_dict(spec):
    """The DatasetDict `spec` names: a save_to_disk folder, a folder of data files, or a hub dataset (cached by
    `datasets`; the same load_dataset call, with a name instead of files)."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    path = Path(spec.dataset)
    try:
        if (path / "dataset_dict.json").exists():
            return datasets.load_from_disk(str(path))
        if path.is_dir():
            files, suffix = local_data_files(path)
            extra = {"delimiter": "\t"} if suffix == ".tsv" else {}
            return datasets.load_dataset(DATA_FILE_TYPES[suffix], data_files=files, **extra)
        return datasets.load_dataset(spec.dataset, spec.dataset_config)
    except UserError:
        raise
    except Exception as e:  # offline, no such dataset or config, unreadable files: datasets raises many kinds
        reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise UserError(f"could not load dataset {spec.name!r} ({reason})") from None


def pick(options, wanted, defaults, what, flag):
    """`wanted` if it is among `options`, else the first of `defaults` that is (None if none is); an unknown
    `wanted`, or none of `defaults` when one is required (what='column'), is refused listing the options."""
    if wanted is not None and wanted not in options:
        raise UserError(f"--{flag} {wanted}: no such {what} (there are: {', '.join(options)})")
    found = wanted or next((d for d in defaults if d in options), None)
    if found is None and what == "column":
        raise UserError(f"no column {' or '.join(map(repr, defaults))}; pass --{flag} (there are: "
                        f"{', '.join(options)})")
    return found


def unlabelled(value):
    """No label: GLUE's test splits hold -1 (ClassLabel's 'missing'), files may leave the cell empty."""
    return value is None or value == -1 or value == ""


def label_text(value):
    """A label value as text. A numeric column with an empty cell is read as floats, so 1.0 is the label 1."""
    return str(int(value)) if isinstance(value, float) and value.is_integer() else str(value)


def label_names(feature, columns):
    """The dataset's label names: its ClassLabel's names when it has one, else the sorted distinct values (as
    text), over every split read."""
    if hasattr(feature, "names"):
        return tuple(feature.names)
    return tuple(label_text(v) for v in sorted({v for values in columns for v in values if not unlabelled(v)}))


def checked_texts(texts, where, column):
    """The text column, refusing the first cell that is empty or not a string."""
    for row, text in enumerate(texts):
        if not isinstance(text, str) or not text.strip():
            what = "empty" if text is None or isinstance(text, str) else f"not a string ({type(text).__name__})"
            raise UserError(f"{where}, row {row}: the text ({column!r}) is {what}")
    return list(texts)


def label_ids(values, feature, names):
    """Label ids into `names` (-1 where a row has no label)."""
    index = {name: i for i, name in enumerate(names)}
    if hasattr(feature, "names"):
        return [-1 if unlabelled(v) else int(v) for v in values]
    return [-1 if unlabelled(v) else index[label_text(v)] for v in values]


def load_text_data(spec):
    """The splits a run trains and evaluates on: CoLA's three files, or the train / eval / test splits of any
    dataset, with label names. Rows without a label are left out (and said so); the test split is the second
    evaluation when it has labels."""
    if spec.is_cola:
        return TextData(load_cola(spec.data_dir or default_cola_dir()), LABELS, COLA_TITLES)
    dd = load_dataset_dict(spec)
    names = {"train": pick(list(dd), spec.train_split, (), "split", "train_split"),
             "dev": pick(list(dd), spec.eval_split, ("validation", "dev"), "split", "eval_split"),
             "ood": pick(list(dd), spec.test_split, ("test",), "split", "test_split")}
    if names["dev"] is None:
        raise UserError(f"{spec.name}: no validation or dev split; pass --eval_split (there are: {', '.join(dd)})")
    parts = {k: dd[v] for k, v in names.items() if v is not None}
    columns = list(parts["train"].column_names)
    text = pick(columns, spec.text_column, TEXT_COLUMNS, "column", "text_column")
    label = pick(columns, spec.label_column, LABEL_COLUMNS, "column", "label_column")
    feature = parts["train"].features[label]
    labels = label_names(feature, [p[label] for p in parts.values()])
    data = TextData({}, labels, {k: names[k] for k in ("dev", "ood")})
    for key, part in parts.items():
        add_split(data, key, names[key], part, text, label, feature, spec)
    check_classes(data, spec, names["train"], label)
    return data


def add_split(data, key, split, part, text, label, feature, spec):
    """Put one split's labelled rows into `data`, noting those left out; an evaluation split with no labels at all
    is left out whole (the test split) or refused (the validation split)."""
    where = f"{spec.name}, split {split!r}"
    sentences = checked_texts(part[text], where, text)
    ids = label_ids(part[label], feature, data.labels)
    keep = [i for i, y in enumerate(ids) if y >= 0]
    if not keep and key == "ood":
        data.notes.append(f"the {split} split has no labels: no second evaluation")
        return
    if not keep:
        raise UserError(f"{where}: no row has a label in {label!r}")
    if len(keep) < len(ids):
        data.notes.append(f"{len(ids) - len(keep)} unlabelled rows of {split} left out")
    data.splits[key] = ([sentences[i] for i in keep], [ids[i] for i in keep])


def check_classes(data, spec, split, label):
    if len(data.labels) < 2 or len(set(data.splits["train"][1])) < 2:
        found = sorted({data.labels[y] for y in data.splits["train"][1]})
        raise UserError(f"{spec.name}, split {split!r}: the label column {label!r} has one class only "
                        f"({', '.join(map(repr, found))}); classification needs two or more")


def read_table_file(path, spec):
    """(sentences, label names or None) of a csv / tsv / json / jsonl / parquet file, read with the run's columns."""
    import datasets
    datasets.disable_progress_bars()
    datasets.utils.logging.set_verbosity_error()
    extra = {"delimiter": "\t"} if path.suffix == ".tsv" else {}
    try:
        table = datasets.load_dataset(DATA_FILE_TYPES[path.suffix], data_files=str(path), split="train", **extra)
    except Exception as e:
        raise UserError(f"--input {path}: cannot read it ({str(e).strip().splitlines()[0]})") from None
    text = pick(table.column_names, spec.text_column, TEXT_COLUMNS, "column", "text_column")
    label = pick(table.column_names, spec.label_column, LABEL_COLUMNS, "label column", "label_column")
    sentences = checked_texts(table[text], f"--input {path}", text)
    if label is None:
        return sentences, None
    feature = table.features[label]
    names = [None if unlabelled(v) else feature.names[v] if hasattr(feature, "names") else label_text(v)
             for v in table[label]]
    return sentences, names


def read_sentences(sentences=None, input_path=None, spec=DataSpec()):
    """(sentences, label names or None) from a list, a file (plain lines, a CoLA TSV, or a data file with the
    run's columns), the evaluation split of a dataset other than CoLA, or standard input."""
    if sentences:
        return sentences, None
    if input_path:
        path = Path(input_path)
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as e:
            raise UserError(f"--input {path}: cannot read it ({e})") from None
        first = next((line for line in text_lines(text) if line.strip()), "").split("\t")
        if len(first) == 4 and first[1] in ("0", "1"):  # a CoLA-format TSV: source, label, original mark, sentence
            sentences, labels = read_cola_tsv(path)
            return sentences, [LABELS[y] for y in labels]
        if path.suffix in DATA_FILE_TYPES:
            return read_table_file(path, spec)
    elif not spec.is_cola:
        data = load_text_data(spec)
        sentences, labels = data.splits["dev"]
        return sentences, [data.labels[y] for y in labels]
    else:
        text = sys.stdin.read()
    return text_lines(text), None


def text_lines(text):
    """The lines of a text file: split at line ends only (\n, \r\n, \r), not at the other characters that
    str.splitlines takes for line breaks (U+2028, form feed, ...), which can sit inside a sentence."""
    lines = io.StringIO(text, newline=None).read().split("\n")
    return lines[:-1] if lines[-1] == "" else lines


def data_fingerprint(splits):
    """A short hash of the exact training and evaluation data ({name: object with .tokens and .labels})."""
    h = hashlib.sha256()
    for name in sorted(splits):
        h.update(repr((splits[name].tokens, splits[name].labels.tolist())).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- run flags and checkpoints

def flags(args):
    """A parsed command line's flags: the namespace less the subcommand's function and check, which argparse keeps
    beside them."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "check")}


def result_flags(args):
    """The flags that decide a run's result: a resumed run must share them with the run it continues, and a sweep
    skips a run already logged with them (and the same --epochs). Where it runs and how it reports do not count."""
    ignored = ("resume", "debug", "epochs", "device", "compile", "tensorboard", "micro_batch_tokens")
    return {k: v for k, v in flags(args).items() if k not in ignored}


RUN_INFO = "run_info.json"  # how the run that wrote a checkpoint was configured (ignored by PEFT)


def read_json(path, what):
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path}: no such file ({what})") from None
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{path}: corrupt {what} ({e})") from None


def read_tensors(path):
    from safetensors import SafetensorError
    from safetensors.torch import load_file
    if not Path(path).exists():
        raise UserError(f"{path}: no such file")
    try:
        return load_file(path)
    except (SafetensorError, OSError) as e:
        raise UserError(f"{path}: corrupt or truncated checkpoint ({e})") from None


def save_checkpoint(folder, weights_name, tensors, json_files):
    """Write `tensors` (safetensors, fp32) and `json_files` ({name: object}) into `folder`, as save_pretrained does:
    these files are replaced together (all written before any is replaced), anything else there is left alone."""
    from safetensors.torch import save_file
    with atomic_files(folder, [weights_name, *json_files]) as tmp:
        save_file({k: v.detach().float().contiguous().cpu() for k, v in tensors.items()}, tmp[weights_name],
                  metadata={"format": "pt"})
        for name, obj in json_files.items():
            Path(tmp[name]).write_text(json.dumps(obj, indent=2) + "\n", encoding="utf-8")


# ----------------------------------------------------------------------------- command-line plumbing

def number_in(kind, low=None, high=None, low_open=False, high_open=False):
    """An argparse type: `kind` (int or float) within [low, high], each end optionally open."""
    def parse(text):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a{'n integer' if kind is int else ' number'}: {text!r}") from None
        too_low = low is not None and (value <= low if low_open else value < low)
        too_high = high is not None and (value >= high if high_open else value > high)
        if too_low or too_high or value != value:  # value != value: NaN
            left, right = "(" if low_open else "[", ")" if high_open else "]"
            bounds = f"{left}{'-inf' if low is None else low}, {'inf' if high is None else high}{right}"
            raise argparse.ArgumentTypeError(f"must be in {bounds}, got {text}")
        return value
    return parse


positive_int = number_in(int, 1)
non_negative_int = number_in(int, 0)
positive_float = number_in(float, 0, low_open=True)
non_negative_float = number_in(float, 0)
fraction = number_in(float, 0, 1)
seed_int = number_in(int, 0, 2 ** 32 - 1)


def gpu_device(text):
    """The assignment's --gpu_id N, as the device cuda:N."""
    return f"cuda:{non_negative_int(text)}"


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, so nobody has to open the code to learn it; an option without a fixed
    default (None) says in its help what it falls back to."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), pointing at --help instead of the usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs | {"allow_abbrev": False,  # --seed must never be read as --seeds
                                            "formatter_class": DefaultsHelpFormatter})

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


# ----------------------------------------------------------------------------- `run.py info`: what a bug report needs

def package_versions():
    import importlib.metadata
    versions = {"python": sys.version.split()[0], "torch": torch.__version__}
    for name in ("transformers", "peft", "tiktoken"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = "not installed"
    return versions


def cpu_name():
    """The CPU's model name from /proc/cpuinfo (Linux), else what `platform` knows."""
    import platform
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


def cuda_devices():
    """One line per CUDA device: name, compute capability, memory, and whether it runs bf16 natively."""
    lines = []
    for i in range(torch.cuda.device_count() if torch.cuda.is_available() else 0):
        p = torch.cuda.get_device_properties(i)
        free, total = torch.cuda.mem_get_info(i)
        lines.append(f"cuda:{i} {p.name}, capability {p.major}.{p.minor}, {total / 2 ** 30:.1f} GiB "
                     f"({free / 2 ** 30:.1f} free), bf16 {'native' if p.major >= 8 else 'emulated only'}")
    return lines or [f"none ({'no device' if torch.backends.cuda.is_built() else 'torch built without CUDA'})"]


def where(path, present):
    return f"{path} ({'present' if present else 'missing: fetched on first use'})"


def data_locations():
    """Where the tokenizer, CoLA and the Hugging Face hub cache are, and whether they are there."""
    import tempfile as tmp
    tiktoken_dir = os.environ.get("TIKTOKEN_CACHE_DIR") or os.environ.get("DATA_GYM_CACHE_DIR") or \
        os.path.join(tmp.gettempdir(), "data-gym-cache")  # tiktoken's default
    hub = os.environ.get("HF_HUB_CACHE") or os.path.join(
        os.environ.get("HF_HOME", os.path.join(os.path.expanduser("~"), ".cache", "huggingface")), "hub")
    cola = Path(default_cola_dir())
    return {"tokenizer": where(tiktoken_dir, Path(tiktoken_dir).is_dir() and any(Path(tiktoken_dir).iterdir())),
            "CoLA (--data_dir default)": where(cola, all((cola / n).exists() for n in COLA_SPLITS.values())),
            "Hugging Face hub cache": where(hub, Path(hub).is_dir())}


def system_report(device, bytes_per_token):
    """`run.py info`: versions, hardware, what each subcommand would choose on `device`, where the data is."""
    dtype = lambda training: str(compute_dtype("auto", device, training)).removeprefix("torch.")
    gen_dtype = str(compute_dtype("auto", device, decoding=DecodingWork())).removeprefix("torch.")
    cpu_bf16 = has_fast_bf16(torch.device("cpu"))
    lines = [", ".join(f"{k} {v}" for k, v in package_versions().items()),
             f"CPU: {cpu_name()}, {torch.get_num_threads()} threads, {torch.backends.cpu.get_cpu_capability()}, "
             f"bf16 matmuls {'fast (AMX/AVX512-BF16)' if cpu_bf16 else 'slow (no AMX/AVX512-BF16)'}, "
             f"fp32 matmul precision {torch.get_float32_matmul_precision()}",
             *[f"CUDA: {line}" for line in cuda_devices()],
             f"MPS: {'available' if torch.backends.mps.is_available() else 'not available'}",
             f"chosen here with --dtype auto: device {device}",
             f"  gen: {gen_dtype}" + (" (measured for each run's work: here one sample of 100 new tokens)"
                                      if device.type == "cpu" else ""),
             f"  predict: {dtype(False)}",
             f"  LoRA, rnn, distil: {dtype(True)}{' with loss scaling' if dtype(True) == 'float16' else ''}, "
             f"micro-batch {default_micro_batch_tokens(device, bytes_per_token)} tokens (LoRA on gpt2)"]
    lines += [f"{name}: {place}" for name, place in data_locations().items()]
    return "\n".join(lines)
