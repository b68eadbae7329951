"""Everything around the models: errors, seeding, devices, tokenizer, CoLA data, atomic files, checkpoints."""
import contextlib
import csv
import hashlib
import io
import json
import os
import random
import signal
import stat
import tempfile
import threading
import urllib.request
import zipfile
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
    if name == "auto":
        return torch.device(f"cuda:{torch.cuda.current_device()}" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise UserError(f"--device {name}: no CUDA device is available here (use --device cpu)")
    try:
        return torch.device(name)
    except RuntimeError:
        raise UserError(f"--device {name}: not a device name (try auto, cpu, cuda, cuda:1)") from None


def has_fast_bf16(device):
    """True where bf16 matmuls beat fp32: CUDA with bf16 support, or a CPU with AMX / AVX512-BF16."""
    if device.type == "cuda":
        return torch.cuda.is_bf16_supported()
    # Not mkldnn's bf16 support: it is true on any AVX512 CPU, where oneDNN emulates bf16 about 3x slower than fp32.
    return device.type == "cpu" and (torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


def compute_dtype(flag, device):
    """The dtype that `--dtype` asks for; `auto` is bf16 where the hardware runs it fast, else fp32."""
    if flag == "auto":
        return torch.bfloat16 if has_fast_bf16(device) else torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[flag]


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
    mode open() would give it (mkstemp makes its files private, 0o600)."""
    path = Path(path)
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


def append_jsonl(path, record):
    """Append one JSON line by rewriting the file atomically (a crash never leaves half a line), holding a lock on
    its folder so that runs side by side (tune --parallel) never lose each other's lines; the lock leaves no file."""
    import fcntl
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        old = Path(path).read_text(encoding="utf-8") if Path(path).exists() else ""
        write_text(path, old + json.dumps(record) + "\n")
    finally:
        os.close(fd)  # releases the lock


def read_jsonl(path):
    if not Path(path).exists():
        return []
    return [json.loads(line) for line in Path(path).read_text(encoding="utf-8").splitlines() if line.strip()]


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
        sentences.append(row[3])
        labels.append(int(row[1]))
    if not sentences:
        raise UserError(f"{path}: no rows")
    return sentences, labels


def load_cola(data_dir):
    """{'train'|'dev'|'ood': (sentences, labels)} from the raw release in `data_dir`."""
    data_dir = ensure_cola(data_dir)
    return {split: read_cola_tsv(data_dir / name) for split, name in COLA_SPLITS.items()}


# ----------------------------------------------------------------------------- checkpoints

ADAPTER_CONFIG, ADAPTER_WEIGHTS = "adapter_config.json", "adapter_model.safetensors"
STUDENT_CONFIG, STUDENT_WEIGHTS = "config.json", "model.safetensors"
RUN_INFO = "run_info.json"  # how the run that wrote a checkpoint was configured (ignored by PEFT)
PEFT_PREFIX = "base_model.model."


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


def save_adapter(model, folder, *, rank, alpha, dropout, targets, base_model, run_info):
    """Save the trainable tensors (LoRA A/B, LayerNorms, head) in PEFT's LoRA format for
    GPT2ForSequenceClassification: `PeftModel.from_pretrained` loads the folder as it is."""
    tensors = {PEFT_PREFIX + k: v for k, v in model.named_parameters() if v.requires_grad}
    config = {"peft_type": "LORA", "task_type": "SEQ_CLS", "base_model_name_or_path": base_model,
              "r": rank, "lora_alpha": alpha, "lora_dropout": dropout, "target_modules": list(targets),
              "fan_in_fan_out": True,  # GPT-2's checkpoints store these layers as Conv1D (in, out)
              "bias": "none", "modules_to_save": ["ln_1", "ln_2", "ln_f", "score"],
              "use_rslora": False, "use_dora": False, "inference_mode": True}
    save_checkpoint(folder, ADAPTER_WEIGHTS, tensors, {ADAPTER_CONFIG: config, RUN_INFO: run_info})


def read_adapter_config(folder):
    """The LoRA settings of an adapter folder: {'r', 'alpha', 'targets', 'base_model'}, refusing what we can't run."""
    from model import LORA_TARGETS
    path = Path(folder) / ADAPTER_CONFIG
    if not Path(folder).is_dir():
        raise UserError(f"{folder}: no such adapter folder")
    cfg = read_json(path, "adapter config")
    for key, ok in (("peft_type", "LORA"), ("use_dora", False), ("use_rslora", False), ("bias", "none")):
        if cfg.get(key, ok) != ok:
            raise UserError(f"{path}: {key}={cfg[key]!r} is not supported (only plain LoRA: {key}={ok!r})")
    if cfg.get("layers_to_transform") is not None or cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        raise UserError(f"{path}: per-layer ranks or layer subsets are not supported")
    wanted = cfg.get("target_modules") or []
    wanted = [wanted] if isinstance(wanted, str) else wanted
    targets = [t for t in LORA_TARGETS if any(t == w or t.endswith("." + w) for w in wanted)]
    unknown = [w for w in wanted if not any(t == w or t.endswith("." + w) for t in LORA_TARGETS)]
    if unknown or not targets:
        raise UserError(f"{path}: target_modules {unknown or wanted} are not GPT-2 layers we adapt "
                        f"(supported: {', '.join(LORA_TARGETS)})")
    try:
        return {"r": int(cfg["r"]), "alpha": float(cfg.get("lora_alpha", 8)), "targets": targets,
                "base_model": cfg.get("base_model_name_or_path")}
    except (KeyError, TypeError, ValueError) as e:
        raise UserError(f"{path}: corrupt adapter config (r: {e})") from None


def injected_targets(named_parameters):
    """The LoRA targets present in a model, e.g. ['attn.c_attn', 'mlp.c_fc']."""
    return sorted({".".join(k.split(".")[3:5]) for k in named_parameters if ".lora_A." in k})


def load_adapter_weights(model, folder):
    """Copy an adapter's tensors into a model that already has LoRA injected with the same settings."""
    path = Path(folder) / ADAPTER_WEIGHTS
    tensors = {k.removeprefix(PEFT_PREFIX): v for k, v in read_tensors(path).items()}
    ours = dict(model.named_parameters())
    unknown = sorted(tensors.keys() - ours.keys())
    if unknown:
        raise UserError(f"{path}: holds {unknown[0]}, outside the target set {injected_targets(ours)} that "
                        f"{ADAPTER_CONFIG} declares")
    if "score.weight" not in tensors:
        raise UserError(f"{path}: no classification head (score.weight): not an adapter for sequence classification")
    missing = [k for k in ours if ".lora_" in k and k not in tensors]
    if missing:
        raise UserError(f"{path}: lacks {missing[0]}, inside the target set {injected_targets(ours)} that "
                        f"{ADAPTER_CONFIG} declares")
    with torch.no_grad():
        for key, value in tensors.items():
            if value.shape != ours[key].shape:
                raise UserError(f"{path}: {key} has shape {tuple(value.shape)} but this model's is "
                                f"{tuple(ours[key].shape)} (an adapter of another variant or rank)")
            ours[key].copy_(value)
    return sorted(tensors)
