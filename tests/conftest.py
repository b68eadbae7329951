"""Shared fixtures: tiny GPT-2 checkpoints made with transformers, the real CoLA files, the tokenizer.

Offline (CI) the tokenizer and CoLA come from ../shared/data (or the variables .ci/run sets); on a machine with
internet and no ../shared they are downloaded by the program's own code paths.
"""
import os
from pathlib import Path
import subprocess
import sys

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent
SHARED = ROOT.parent / "shared" / "data"
if "TIKTOKEN_CACHE_DIR" not in os.environ and (SHARED / "tiktoken").is_dir():
    os.environ["TIKTOKEN_CACHE_DIR"] = str(SHARED / "tiktoken")
if "COLA_DATA_DIR" not in os.environ:
    os.environ["COLA_DATA_DIR"] = str(SHARED / "cola") if (SHARED / "cola").is_dir() else str(ROOT / "data" / "cola")
os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
sys.path.insert(0, str(ROOT))

TINY = dict(n_layer=2, n_head=2, n_embd=32, n_positions=128, initializer_range=0.2)
# The public CoLA release: sentences per split, and how many of the in-domain dev ones are acceptable (the
# majority class every score stands beside: 365 / 527 = 69.26%).
COLA_TRAIN, COLA_DEV, COLA_OOD, COLA_DEV_ACCEPTABLE = 8551, 527, 516, 365
# The training sentences every run holds out for temperature scaling (batches.hold_out: about one in ten).
COLA_HELDOUT = 881
# Three sentences of different lengths, padded together in one batch.
PAD_BATCH = [[464, 3797, 3332, 13], [40, 716, 257, 3290, 351, 617, 2456, 13], [15496, 13]]


def save_tiny_gpt2(folder, seed=0, **overrides):
    """A random-weight GPT-2 in transformers' own format (config.json + model.safetensors)."""
    from transformers import GPT2Config, GPT2LMHeadModel
    torch.manual_seed(seed)
    config = GPT2Config(**(TINY | overrides), pad_token_id=50256)
    GPT2LMHeadModel(config).eval().save_pretrained(folder)
    return str(folder)


@pytest.fixture(scope="session")
def tiny_gpt_dir(tmp_path_factory):
    return save_tiny_gpt2(tmp_path_factory.mktemp("tiny-gpt2"))


@pytest.fixture(scope="session")
def cola_dir():
    return os.environ["COLA_DATA_DIR"]


@pytest.fixture(scope="session")
def tokenizer():
    from textdata.readers import get_tokenizer
    return get_tokenizer()


def run_cli(*args, cwd, timeout=600, input=None):
    """Run `python run.py ARGS` in `cwd` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          input=input, text=True, timeout=timeout, env=os.environ | {"PYTHONPATH": str(ROOT)})


def run_main(*args, cwd, monkeypatch, capfd):
    """What `python run.py ARGS` in `cwd` does, in this process: run.main's exit code and what it printed, read at
    the file descriptors (so output from C code or a library counts, as in a real process). No new interpreter and
    no torch import: about 5 s less a call on a 2-core CPU."""
    import run
    monkeypatch.chdir(cwd)
    capfd.readouterr()
    try:
        code = run.main([str(a) for a in args])
    except SystemExit as e:  # a usage error, from argparse
        code = e.code
    out, err = capfd.readouterr()
    return subprocess.CompletedProcess(["run.py", *args], code, out, err)


def count_classifier_rows(patch=setattr):
    """Make GPTClassifier.forward record how many sentences each call gets (through `patch`, e.g.
    monkeypatch.setattr); returns the list it appends to."""
    from model import GPTClassifier
    seen = []
    forward = GPTClassifier.forward

    def counting(self, idx, lengths):
        seen.append(idx.size(0))
        return forward(self, idx, lengths)

    patch(GPTClassifier, "forward", counting)
    return seen


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device; skipped without one (`pytest -m gpu` runs them)")


def pytest_collection_modifyitems(config, items):
    """Skip the GPU tests where there is no GPU, naming why (-m selects before this, so `-m gpu` reports them)."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="no CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


def padded(seqs):
    """Right-pad token lists with <|endoftext|>, as the training loop does: (ids, lengths)."""
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), 50256)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    return ids, lengths


def randomize_adapter(model, seed=0):
    """Give every trainable tensor (LoRA B included) random values, as after training."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * 0.3)


ALL_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


def tiny_lora_classifier(gpt_dir, targets=ALL_TARGETS):
    """The classifier on the tiny GPT-2 at `gpt_dir` with an untrained rank-4 (alpha 4) LoRA on `targets`, only
    the adapter trainable; seeded, so every call gives the same weights."""
    from model import GPTClassifier, inject_lora, mark_only_lora_as_trainable
    torch.manual_seed(0)
    return mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_pretrained(gpt_dir), 4, 4, 0.0, targets))


def save_tiny_adapter(folder, gpt_dir, targets=ALL_TARGETS, base_model=None, run_info=None):
    """An untrained rank-4 LoRA adapter of the tiny GPT-2 at `gpt_dir`, saved as `run.py LoRA` saves one."""
    from training.checkpoints import save_adapter
    save_adapter(tiny_lora_classifier(gpt_dir, targets), folder, rank=4, alpha=4, dropout=0.0, targets=targets,
                 base_model=base_model or gpt_dir,
                 run_info={"random_init": False, "seed": 0} if run_info is None else run_info)
    return folder


@pytest.fixture(scope="module")
def adapter_dir(tiny_gpt_dir, tmp_path_factory):
    """A tiny teacher adapter on all four targets, as `run.py LoRA` writes it (test_distil)."""
    return save_tiny_adapter(tmp_path_factory.mktemp("teacher") / "adapter", tiny_gpt_dir)


@pytest.fixture(scope="module")
def two_target_adapter_dir(tiny_gpt_dir, tmp_path_factory):
    """A tiny teacher adapter on attn.c_attn and mlp.c_fc only, its run_info.json empty (test_ddp)."""
    return save_tiny_adapter(tmp_path_factory.mktemp("teacher") / "adapter", tiny_gpt_dir,
                             targets=("attn.c_attn", "mlp.c_fc"), run_info={})


def free_port():
    """A TCP port on 127.0.0.1 that nothing listens on now, for a spawned process group's rendezvous."""
    import socket
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, cwd):
    """`torchrun --standalone --nproc_per_node=2 run.py ARGS` in `cwd`."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def run_once_and_on_two_ranks(args, folder):
    """The same command in folder/one (one process) and folder/two (torchrun, 2 ranks); returns torchrun's run."""
    (folder / "one").mkdir()
    (folder / "two").mkdir()
    single = run_cli(*args, cwd=folder / "one")
    assert single.returncode == 0, single.stderr
    ddp = torchrun(*args, cwd=folder / "two")
    assert ddp.returncode == 0, ddp.stderr
    return ddp


def assert_same_run(single, ddp, mode, weights):
    """A run in folder `single` and its torchrun twin in `ddp` reached the same weights, metrics and plots."""
    import json

    from safetensors.torch import load_file
    a, b = load_file(single / weights), load_file(ddp / weights)
    assert a.keys() == b.keys()
    assert max(float((a[k] - b[k]).abs().max()) for k in a) <= 1e-5
    [one] = [json.loads(line) for line in (single / "tuning" / f"{mode}.jsonl").read_text().splitlines()]
    [two] = [json.loads(line) for line in (ddp / "tuning" / f"{mode}.jsonl").read_text().splitlines()]
    for h1, h2 in zip(one["history"], two["history"]):
        assert h1["dev_acc"] == h2["dev_acc"] and h1["dev_mcc"] == pytest.approx(h2["dev_mcc"])
        assert h1["train_loss"] == pytest.approx(h2["train_loss"], abs=1e-5)
    assert one["dev_preds"] == two["dev_preds"] and one["ood_preds"] == two["ood_preds"]
    plots = sorted(p.name for p in (ddp / "plots").iterdir())
    assert plots == sorted(p.name for p in (single / "plots").iterdir()) and f"{mode}_acc.png" in plots


@pytest.fixture(scope="session")
def resumable_run(tiny_gpt_dir, tmp_path_factory):
    """A LoRA run long enough to be stopped midway (args), and its adapter's weights when run to the end once: the
    reference the stop-and-resume tests compare with."""
    from safetensors.torch import load_file
    args = ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "1024", "--epochs", "3", "--dtype", "float32",
            "--lora_dropout", "0.1", "--model_path", "adapter"]
    folder = tmp_path_factory.mktemp("reference-run")
    assert run_cli(*args, cwd=folder).returncode == 0
    return args, load_file(folder / "adapter" / "adapter_model.safetensors")


def start_run(args, folder, stderr=subprocess.DEVNULL):
    """Start `python run.py ARGS` in `folder` as a process of its own (to be stopped midway)."""
    return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=folder, text=True,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL, stderr=stderr)


def assert_same_weights(reference, folder):
    """The adapter in `folder` equals the reference run's (a dict of tensors)."""
    from safetensors.torch import load_file
    ours = load_file(folder / "adapter" / "adapter_model.safetensors")
    assert ours.keys() == reference.keys() and all((ours[k] - reference[k]).abs().max() <= 1e-6 for k in ours)


def in_epoch(monkeypatch, epoch, fault):
    """Call `fault(model, split, loss_fn, optimizer)` as training epoch `epoch` starts (a fault injected per epoch,
    whatever the loop does inside one)."""
    import train_utils
    real, started = train_utils.train_epoch, []

    def train_epoch(model, split, loss_fn, optimizer, **kwargs):
        started.append(1)
        if len(started) == epoch:
            fault(model, split, loss_fn, optimizer)
        return real(model, split, loss_fn, optimizer, **kwargs)

    monkeypatch.setattr(train_utils, "train_epoch", train_epoch)


def peft_lm_adapter(gpt_dir, folder, seed=0, **lora):
    """A CAUSAL_LM adapter saved by PEFT itself, with random (as if trained) weights; returns PEFT's model too."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2LMHeadModel
    torch.manual_seed(seed)
    base = GPT2LMHeadModel.from_pretrained(gpt_dir)
    model = get_peft_model(base, LoraConfig(fan_in_fan_out=True, task_type="CAUSAL_LM", **lora))
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model.eval()


@pytest.fixture(scope="session")
def postgres():
    """A throwaway PostgreSQL server (tests/postgres_server.py) for the session; skipped where PostgreSQL's programs
    or its Python driver are not installed; failed there under POSTGRES_TESTS=required (.ci/run installs both)."""
    import importlib.util

    from postgres_server import PostgresServer, postgres_bin
    bin_dir = postgres_bin()
    if bin_dir is None or importlib.util.find_spec("psycopg") is None:
        why = "PostgreSQL is not installed (Debian: apt-get install postgresql; pip install 'psycopg[binary]')"
        if os.environ.get("POSTGRES_TESTS") == "required":  # CI
            pytest.fail(why)
        pytest.skip(why)
    server = PostgresServer(bin_dir, free_port()).start()
    yield server
    server.stop()
