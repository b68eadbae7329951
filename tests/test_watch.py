"""Watching a run while it runs: plots and the run's record after every epoch, TensorBoard, the device choice
(CUDA, then an Apple GPU, then the CPU), and the assignment's flag names."""
import os
import re
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
import torch

from cli import grid_sweep as tune
from cli.parser import config_of
from config import checks
from config import records as runlog
from config.fields import deciding_values
from conftest import ROOT, run_cli, run_main
import run
from runtime import devices
import utils


def planned(argv):
    """A run's arguments as `tune` plans them: parsed and checked."""
    config = config_of(run.build_parser().parse_args(argv))
    config.validate()
    return {"run": config}


def test_a_killed_run_leaves_its_epochs_plotted_and_logged_unfinished_and_resume_finishes_the_record(
        tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    from PIL import Image
    argv = ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "1024", "--epochs", "3", "--model_path",
            "adapter"]
    proc = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *argv], cwd=tmp_path,
                            env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    log = tmp_path / "tuning" / "LoRA.jsonl"

    def epochs_logged():
        records = runlog.read_jsonl(log) if log.exists() else []
        return len(records[0]["history"]) if records else 0

    deadline = time.time() + 300
    while epochs_logged() < 2 and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGKILL)  # during epoch 3
    proc.wait()
    [record] = runlog.read_jsonl(log)
    assert record["finished"] is False and [h["epoch"] for h in record["history"]] == [1, 2]
    for name in ("LoRA_loss.png", "LoRA_acc.png"):
        with Image.open(tmp_path / "plots" / name) as image:
            image.verify()
    monkeypatch.chdir(tmp_path)
    assert tune.logged_run(planned(argv), runlog.read_records(log)) is None  # a sweep would run it again
    resumed = run_main(*argv, "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert resumed.returncode == 0, resumed.stderr
    [final] = runlog.read_jsonl(log)  # the same record, finished
    assert final["run_id"] == record["run_id"] and final["finished"] is True
    assert [h["epoch"] for h in final["history"]] == [1, 2, 3]
    assert tune.logged_run(planned(argv), runlog.read_records(log))["run_id"] == final["run_id"]


def test_tensorboard_holds_the_step_losses_and_the_printed_epoch_metrics(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    result = run_cli("rnn", "--max_examples", 64, "--batch_size", 16, "--epochs", 2, "--rnn_hidden", 8,
                     "--tensorboard", "runs/mine", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    events = EventAccumulator(str(tmp_path / "runs" / "mine"))
    events.Reload()
    assert len(events.Scalars("train/step_loss")) == 2 * 4  # 64 sentences in batches of 16, two epochs
    printed = re.findall(r"train loss ([\d.]+) acc ([\d.]+)%  \|  dev loss ([\d.]+) acc ([\d.]+)% MCC ([-+\d.]+)",
                         result.stdout)
    assert len(printed) == 2
    for epoch, line in enumerate(printed, start=1):
        values = {tag: events.Scalars(tag)[epoch - 1] for tag in
                  ("train/loss", "train/acc", "dev/loss", "dev/acc", "dev/mcc", "train/lr", "train/tokens_per_s")}
        assert all(v.step == epoch for v in values.values())
        train_loss, train_acc, dev_loss, dev_acc, dev_mcc = map(float, line)
        assert f"{values['train/loss'].value:.4f}" == f"{train_loss:.4f}"
        assert f"{100 * values['train/acc'].value:.2f}" == f"{train_acc:.2f}"
        assert f"{values['dev/loss'].value:.4f}" == f"{dev_loss:.4f}"
        assert f"{100 * values['dev/acc'].value:.2f}" == f"{dev_acc:.2f}"
        assert f"{values['dev/mcc'].value:+.3f}" == f"{dev_mcc:+.3f}"
        assert values["train/lr"].value == pytest.approx(1e-3)
    assert events.Tags()["tensors"] or os.listdir(tmp_path / "runs" / "mine")  # the hyper-parameters summary


def test_where_a_run_reports_does_not_change_what_it_is():
    """--resume and tune compare runs by result_flags: TensorBoard on or off, like the device, is not a new run."""
    parser = run.build_parser()

    def config(*argv):
        return deciding_values(config_of(parser.parse_args(["rnn", *argv])))

    assert config() == config("--tensorboard", "runs/x", "--device", "cpu", "--micro_batch_tokens", "64")
    assert config() != config("--lr", "0.1")


def test_long_names_stay_valid_file_names_and_distinct():
    a, b = utils.safe_name("lr=0.001" + "0" * 300 + "1"), utils.safe_name("lr=0.001" + "0" * 300 + "2")
    assert len(a) == len(b) == 100 and a != b and utils.safe_name("lr=1e-3 seed") == "lr_1e-3_seed"


def test_a_run_whose_state_cannot_be_written_is_refused_before_training(tmp_path, monkeypatch, capfd):
    monkeypatch.setattr(checks, "writable", lambda path: not str(path).endswith(".resume.pt"))
    result = run_main("rnn", "--model_path", "out/s", "--max_examples", 8, cwd=tmp_path, monkeypatch=monkeypatch,
                      capfd=capfd)
    assert result.returncode == 2 and "--model_path out/s: cannot write out/s.resume.pt" in result.stderr
    assert not any(tmp_path.iterdir())


def test_tensorboard_missing_is_one_line_before_training(monkeypatch, capsys, tmp_path):
    monkeypatch.chdir(tmp_path)
    real = checks.importlib.util.find_spec
    monkeypatch.setattr(checks.importlib.util, "find_spec", lambda name: None if name == "tensorboard" else real(name))
    with pytest.raises(SystemExit) as stop:
        run.main(["rnn", "--tensorboard"])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --tensorboard needs the tensorboard package: pip install tensorboard")
    assert err.count("\n") == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("cuda, mps, expected", [(True, True, "cuda:0"), (True, False, "cuda:0"),
                                                 (False, True, "mps"), (False, False, "cpu")])
def test_auto_picks_cuda_then_mps_then_cpu(monkeypatch, cuda, mps, expected):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    monkeypatch.setattr(torch.cuda, "current_device", lambda: 0)
    monkeypatch.setattr(torch.backends.mps, "is_available", lambda: mps)
    assert str(devices.resolve_device("auto")) == expected
    if not mps:
        with pytest.raises(utils.UserError, match="--device mps: no Apple GPU"):
            devices.resolve_device("mps")


def test_mps_decodes_in_fp16_and_trains_in_fp32():
    mps = torch.device("mps")
    assert devices.compute_dtype("auto", mps, training=False) == torch.float16
    assert devices.compute_dtype("auto", mps, training=True) == torch.float32


def test_the_assignments_command_line_runs_unchanged(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    common = ["--gpt_variant", tiny_gpt_dir, "--max_examples", 64, "--epochs", 1, "--dtype", "float32",
              "--model_path", "adapter"]
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    assert run_cli("LoRA", 12345, *common, cwd=tmp_path / "a").returncode == 0
    assert run_main("LoRA", "--seed", 12345, *common, cwd=tmp_path / "b", monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    a = load_file(tmp_path / "a" / "adapter" / "adapter_model.safetensors")
    b = load_file(tmp_path / "b" / "adapter" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    [record] = runlog.read_jsonl(tmp_path / "a" / "tuning" / "LoRA.jsonl")
    assert record["config"]["run"]["seed"] == 12345
    from cli.parser import assignment_argv
    args = run.build_parser().parse_args(assignment_argv(["rnn", "54321", "--hidden_dim", "32", "--gpu_id", "1"]))
    assert (args.seed, args.rnn_hidden, args.device) == (54321, 32, "cuda:1")
