"""A run that says it succeeded has succeeded: no non-finite model is saved, no record says finished without its
model, a resumed run never mixes two datasets, and a stopped sweep names the command that continues it."""
import errno
import json
import re
import shlex
import signal
import subprocess
import time

import safetensors.torch
import torch

from conftest import in_epoch, run_cli, run_main, start_run
import train_utils
from utils import Terminated

SMALL = ["--max_examples", 32, "--rnn_hidden", 16, "--batch_size", 16, "--device", "cpu"]


def records(folder, mode="rnn"):
    path = folder / "tuning" / f"{mode}.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def test_an_epoch_whose_dev_loss_is_nan_is_not_saved(tmp_path, monkeypatch, capfd):
    # Adam's first steps move each weight by about --lr: after one step at 1e30 the ReLU RNN overflows on dev
    result = run_main("rnn", "--lr", "1e30", "--epochs", 1, *SMALL, "--batch_size", 32, cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 1
    assert result.stderr == "error: epoch 1/1: the dev loss became nan; try a lower --lr (nothing saved)\n"
    assert not (tmp_path / "models" / "rnn").exists() and records(tmp_path) == []


def test_weights_made_infinite_by_an_epochs_last_step_are_never_saved(tmp_path, monkeypatch, capfd):
    def inf_after_the_step(model, split, loss_fn, optimizer):
        """Epoch 2 has one step (16 sentences, batches of 16): its loss is finite, the weights it leaves are not."""
        step = optimizer.step

        def step_then_inf(*args, **kwargs):
            out = step(*args, **kwargs)
            with torch.no_grad():
                model.embed.weight[0, 0] = float("inf")
            return out

        optimizer.step = step_then_inf

    in_epoch(monkeypatch, 2, inf_after_the_step)
    result = run_main("rnn", "--epochs", 2, *SMALL, "--max_examples", 16, cwd=tmp_path, monkeypatch=monkeypatch,
                      capfd=capfd)
    assert result.returncode == 1
    assert result.stderr == ("error: epoch 2/2: the weights (embed.weight) became nan or inf; try a lower --lr (the "
                             "state after epoch 1 is in models/rnn.resume.pt)\n")
    assert not (tmp_path / "models" / "rnn").exists()
    state = torch.load(tmp_path / "models" / "rnn.resume.pt", weights_only=True)
    assert state["epoch"] == 1 and all(torch.isfinite(v).all() for v in state["best_state"].values())
    assert [r["finished"] for r in records(tmp_path)] == [False]


def test_a_full_disk_while_saving_leaves_no_finished_record_and_the_rerun_saves(tmp_path, monkeypatch, capfd):
    sweep = ["tune", "rnn", "--seeds", 0, "--epochs", 1, *SMALL]
    real = safetensors.torch.save_file

    def full_disk(tensors, filename, metadata=None):
        raise OSError(errno.ENOSPC, "No space left on device", filename)

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    failed = run_main(*sweep, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert failed.returncode == 1 and failed.stderr.count("\n") == 1
    assert failed.stderr.startswith("error: models/tune/rnn/_seed0: could not save the model (No space left on "
                                    "device); its previous files are as they were; the run's state is kept in "
                                    "models/tune/rnn/_seed0.resume.pt")
    assert [r["finished"] for r in records(tmp_path)] == [False]
    assert list((tmp_path / "models" / "tune" / "rnn" / "_seed0").iterdir()) == []
    monkeypatch.setattr(safetensors.torch, "save_file", real)  # space freed
    again = run_main(*sweep, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert again.returncode == 0, again.stderr
    assert "skipped" not in again.stdout and "resuming after epoch 1" in again.stdout
    assert [r["finished"] for r in records(tmp_path)] == [True]
    assert (tmp_path / "models" / "tune" / "rnn" / "_seed0" / "model.safetensors").exists()
    assert not (tmp_path / "models" / "tune" / "rnn" / "_seed0.resume.pt").exists()


def two_class_folder(folder, flip=False):
    """A small folder dataset of two classes (the labels swapped when `flip`); returns its files' bytes."""
    folder.mkdir(exist_ok=True)
    words = {"a": ["goal", "match", "team", "coach"], "b": ["soup", "bread", "salad", "cake"]}
    rows = [(f"The {w} number {i}.", ("b" if label == "a" else "a") if flip else label)
            for i in range(6) for label, ws in words.items() for w in ws]
    for name in ("train.csv", "validation.csv"):
        (folder / name).write_text("sentence,label\n" + "".join(f"{s},{y}\n" for s, y in rows))
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def stop_in_epoch_2(model, split, loss_fn, optimizer):
    raise Terminated()


def test_resume_on_changed_data_is_refused_naming_the_split(tmp_path, monkeypatch, capfd):
    two_class_folder(tmp_path / "data")
    args = ["rnn", "--dataset", "data", "--epochs", 2, *SMALL]
    in_epoch(monkeypatch, 2, stop_in_epoch_2)
    assert run_main(*args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 143
    state = tmp_path / "models" / "rnn.resume.pt"
    saved = state.read_bytes()
    files = two_class_folder(tmp_path / "data", flip=True)  # the labels flipped while the run was stopped
    resumed = run_main(*args, "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert resumed.returncode == 1
    assert resumed.stderr == ("error: models/rnn.resume.pt: saved on other data: the 'train' split has changed "
                              "since (rows added, removed or relabelled); rerun without --resume to start over (in "
                              "a sweep: with --restart)\n")
    assert state.read_bytes() == saved and not (tmp_path / "models" / "rnn").exists()
    assert {p.name: p.read_bytes() for p in (tmp_path / "data").iterdir()} == files


def test_a_sweep_on_changed_data_is_refused_and_restart_starts_it_over(tmp_path, monkeypatch, capfd):
    two_class_folder(tmp_path / "data")
    sweep = ["tune", "rnn", "--seeds", 0, "--dataset", "data", "--epochs", 2, *SMALL]
    real = train_utils.train_epoch
    in_epoch(monkeypatch, 2, stop_in_epoch_2)
    assert run_main(*sweep, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 143
    monkeypatch.setattr(train_utils, "train_epoch", real)
    two_class_folder(tmp_path / "data", flip=True)
    refused = run_main(*sweep, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert refused.returncode == 1 and "saved on other data: the 'train' split has changed" in refused.stderr
    restarted = run_main(*sweep, "--restart", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert restarted.returncode == 0, restarted.stderr
    assert "resuming" not in restarted.stdout
    [record] = [r for r in records(tmp_path, "rnn-data") if r["finished"]]
    assert [h["epoch"] for h in record["history"]] == [1, 2]


def continue_command(stderr):
    """The command a stopped sweep's one line says to run, as arguments after `python run.py`."""
    assert stderr.count("\n") == 1, stderr
    found = re.search(r"rerun `python run\.py (.*)` to continue: the finished runs are skipped, the interrupted ones "
                      r"resume from their last saved epoch$", stderr.strip())
    assert found, stderr
    return shlex.split(found.group(1))


def test_a_sweep_stopped_midway_prints_the_command_that_continues_it(tmp_path, monkeypatch, capfd):
    sweep = ["tune", "rnn", "--seeds", 1, 2, "--epochs", 2, *SMALL]
    real = train_utils.train_epoch
    in_epoch(monkeypatch, 2, stop_in_epoch_2)  # seed 1's second epoch
    stopped = run_main(*sweep, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert stopped.returncode == 143
    assert stopped.stderr.startswith("error: terminated (SIGTERM) during epoch 2; the state after epoch 1 is in "
                                     "models/tune/rnn/_seed1.resume.pt; rerun `python run.py tune rnn")
    command = continue_command(stopped.stderr)
    assert command == [str(a) for a in sweep]
    monkeypatch.setattr(train_utils, "train_epoch", real)
    continued = run_main(*command, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert continued.returncode == 0, continued.stderr
    assert continued.stdout.count("resuming after epoch 1") == 1
    done = [r for r in records(tmp_path) if r["finished"]]
    assert sorted(r["config"]["run"]["seed"] for r in done) == [1, 2]
    assert all([h["epoch"] for h in r["history"]] == [1, 2] for r in done)


def test_sigterm_to_a_parallel_sweep_names_the_command_that_continues_it(tmp_path):
    sweep = ["tune", "rnn", "--seeds", 1, 2, "--parallel", 2, "--max_examples", 512, "--epochs", 4, "--rnn_hidden", 8,
             "--device", "cpu", "--name", "par"]
    proc = start_run(sweep, tmp_path, stderr=subprocess.PIPE)
    deadline = time.time() + 300
    while not list(tmp_path.glob("models/tune/par/*.resume.pt")) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.01)
    proc.send_signal(signal.SIGTERM)
    stderr = proc.communicate(timeout=300)[1]
    assert proc.returncode == 143, stderr
    assert stderr.startswith("error: terminated (SIGTERM); rerun `python run.py tune rnn"), stderr
    command = continue_command(stderr)
    assert command == [str(a) for a in sweep]
    continued = run_cli(*command, cwd=tmp_path)
    assert continued.returncode == 0, continued.stderr
    logs = [p.read_text() for p in (tmp_path / "tuning" / "par-logs").iterdir()]
    assert any("resuming after epoch" in log for log in logs)  # at least the run whose state was seen
    done = [r for r in records(tmp_path) if r["finished"]]
    assert sorted(r["config"]["run"]["seed"] for r in done) == [1, 2]
    assert not list(tmp_path.glob("models/tune/par/*.resume.pt"))
