"""Shared fixtures: tiny GPT-2 checkpoints made with transformers, the real CoLA files, the tokenizer.

Offline (CI) the tokenizer and CoLA come from ../shared/data (or the variables .ci/run sets); on a machine with
internet and no ../shared they are downloaded by the program's own code paths.
"""
import os
import subprocess
import sys
from pathlib import Path

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
    from utils import get_tokenizer
    return get_tokenizer()


def run_cli(*args, cwd, timeout=600, input=None):
    """Run `python run.py ARGS` in `cwd` as a user would; returns the CompletedProcess."""
    return subprocess.run([sys.executable, str(ROOT / "run.py"), *map(str, args)], cwd=cwd, capture_output=True,
                          input=input, text=True, timeout=timeout, env=os.environ | {"PYTHONPATH": str(ROOT)})


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
