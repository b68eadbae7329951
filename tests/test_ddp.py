"""torchrun: two CPU processes (gloo) give the same model and metrics as one process with the same global batch;
only rank 0 writes; the teacher runs once per sentence in total."""
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import ROOT, count_classifier_rows, run_cli
from model import GPTClassifier, inject_lora, mark_only_lora_as_trainable
from model import save_adapter


def torchrun(*args, cwd):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", str(ROOT / "run.py"),
           *map(str, args)]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=600,
                          env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"})


def assert_same_run(single, ddp, mode, weights):
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


@pytest.fixture(scope="module")
def adapter_dir(tiny_gpt_dir, tmp_path_factory):
    torch.manual_seed(0)
    targets = ["attn.c_attn", "mlp.c_fc"]
    model = mark_only_lora_as_trainable(inject_lora(GPTClassifier.from_pretrained(tiny_gpt_dir), 4, 4, 0.0, targets))
    folder = tmp_path_factory.mktemp("teacher") / "adapter"
    save_adapter(model, folder, rank=4, alpha=4, dropout=0.0, targets=targets,
                 base_model=tiny_gpt_dir, run_info={})
    return folder


def run_once_and_on_two_ranks(args, folder):
    """The same command in folder/one (one process) and folder/two (torchrun, 2 ranks); returns torchrun's run."""
    (folder / "one").mkdir()
    (folder / "two").mkdir()
    single = run_cli(*args, cwd=folder / "one")
    assert single.returncode == 0, single.stderr
    ddp = torchrun(*args, cwd=folder / "two")
    assert ddp.returncode == 0, ddp.stderr
    return ddp


def test_lora_on_two_ranks_equals_one_process(tiny_gpt_dir, tmp_path):
    ddp = run_once_and_on_two_ranks(["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", 256, "--batch_size", 64,
                                     "--epochs", 2, "--dtype", "float32", "--model_path", "adapter"], tmp_path)
    assert ddp.stdout.count("Number of parameters") == 1  # only rank 0 prints
    assert_same_run(tmp_path / "one", tmp_path / "two", "LoRA", "adapter/adapter_model.safetensors")


def test_distil_on_two_ranks_equals_one_process(adapter_dir, tmp_path):
    run_once_and_on_two_ranks(["distil", "--model_path", adapter_dir, "--max_examples", 256, "--batch_size", 64,
                               "--epochs", 2, "--rnn_hidden", 16, "--dtype", "float32"], tmp_path)
    assert_same_run(tmp_path / "one", tmp_path / "two", "distil", "models/distil-rnn/model.safetensors")


def count_teacher_rows(rank, world, port, adapter, workdir):
    """One rank of a distil run (spawned), counting the sentences its teacher forward sees."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world),
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    os.chdir(workdir)
    import run
    seen = count_classifier_rows()
    code = run.main(["distil", "--model_path", str(adapter), "--max_examples", "64", "--epochs", "1",
                     "--rnn_hidden", "8", "--dtype", "float32"])
    Path(workdir, f"rank{rank}.json").write_text(json.dumps({"code": code, "rows": sum(seen)}))


def test_teacher_runs_once_per_sentence_across_ranks(adapter_dir, tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    torch.multiprocessing.spawn(count_teacher_rows, args=(2, port, adapter_dir, tmp_path), nprocs=2)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["code"] for r in ranks] == [0, 0]
    assert sum(r["rows"] for r in ranks) == 64 + 527 + 516 and all(r["rows"] > 0 for r in ranks)
    assert len((tmp_path / "tuning" / "distil.jsonl").read_text().splitlines()) == 1
