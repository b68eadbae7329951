"""What a run writes: into the user's folders without removing anything of theirs, atomically, with the modes the
umask gives; SIGTERM stops a run like Ctrl-C; a failure on rank 0 stops the other ranks; --help shows defaults."""
import argparse
import json
import os
from pathlib import Path
import signal
import subprocess
import sys
import time

import pytest
from safetensors.torch import load_file
import torch

from config import records as runlog
from conftest import ROOT, assert_same_weights, free_port, run_main, start_run
import run
from textdata import readers as data
from training import checkpoints
from training.checkpoints import load_student
import utils

TINY_RNN = ["--max_examples", "32", "--batch_size", "16", "--epochs", "1", "--rnn_hidden", "8"]


def user_folder(path):
    """A folder holding a user's own file, as it would before they point an output at it."""
    path.mkdir()
    (path / "thesis.tex").write_bytes(b"\\section{Results}\n% not ours to delete\n")
    return path / "thesis.tex"


def test_user_files_survive_in_every_output_folder(tiny_gpt_dir, tmp_path, monkeypatch):
    from transformers import GPT2ForSequenceClassification
    monkeypatch.chdir(tmp_path)
    outputs = {"LoRA": user_folder(tmp_path / "lora"), "export": user_folder(tmp_path / "exported"),
               "rnn": user_folder(tmp_path / "rnn"), "distil": user_folder(tmp_path / "distil")}
    before = {mode: path.read_bytes() for mode, path in outputs.items()}
    commands = {"LoRA": ["LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", "32", "--epochs", "1",
                         "--model_path", "lora"],
                "export": ["export", "--model_path", "lora", "--out", "exported"],
                "rnn": ["rnn", *TINY_RNN, "--model_path", "rnn"],
                "distil": ["distil", *TINY_RNN, "--model_path", "lora", "--student_path", "distil"]}
    for mode, argv in commands.items():
        assert run.main(argv) == 0, mode
        assert outputs[mode].read_bytes() == before[mode], mode
    checkpoints.load_lora_classifier("lora")
    GPT2ForSequenceClassification.from_pretrained("exported")
    load_student("rnn")
    load_student("distil")
    assert run.main(commands["rnn"]) == 0  # a second run into the same folder replaces only our files
    assert sorted(p.name for p in (tmp_path / "rnn").iterdir()) == ["README.md", "config.json", "model.safetensors",
                                                                   "run_info.json", "thesis.tex"]


def test_a_readme_the_user_wrote_in_a_model_folder_is_never_replaced(tmp_path, monkeypatch, capfd):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "rnn").mkdir()
    theirs = tmp_path / "rnn" / "README.md"
    theirs.write_text("# My student\n\nNotes for my supervisor.\n")
    argv = ["rnn", *TINY_RNN, "--model_path", "rnn"]
    assert run.main(argv) == 0
    assert theirs.read_text() == "# My student\n\nNotes for my supervisor.\n"
    assert "not a card this project wrote" in capfd.readouterr().err
    theirs.unlink()
    assert run.main(argv) == 0  # a card of ours is written, and replaced by the next save
    first = theirs.read_text()
    assert checkpoints.CARD_MARKER in first
    assert run.main([*argv, "--seed", "1"]) == 0
    assert theirs.read_text() != first and checkpoints.CARD_MARKER in theirs.read_text()


CRASH_MID_SAVE = """
import os, sys
sys.path.insert(0, {root!r})
import torch, safetensors.torch
from training import checkpoints
from model import DistilRNN, RNNConfig
torch.manual_seed(1)
old = DistilRNN(RNNConfig(hidden=8)).state_dict()
checkpoints.save_checkpoint("out", "model.safetensors", old, {{"config.json": {{}}}})
save_file = safetensors.torch.save_file
def then_crash(*args, **kwargs):  # the power goes out right after the first file of the new checkpoint is written
    save_file(*args, **kwargs)
    os._exit(9)
safetensors.torch.save_file = then_crash
torch.manual_seed(2)
new = DistilRNN(RNNConfig(hidden=8)).state_dict()
checkpoints.save_checkpoint("out", "model.safetensors", new, {{"config.json": {{"new": 1}}}})
"""


def test_crash_mid_save_leaves_the_previous_checkpoint_whole(tmp_path):
    from model import DistilRNN, RNNConfig
    mine = user_folder(tmp_path / "out")
    result = subprocess.run([sys.executable, "-c", CRASH_MID_SAVE.format(root=str(ROOT))], cwd=tmp_path)
    assert result.returncode == 9
    torch.manual_seed(1)
    first = DistilRNN(RNNConfig(hidden=8)).state_dict()
    saved = load_file(tmp_path / "out" / "model.safetensors")
    assert all(torch.equal(saved[k], first[k]) for k in first)  # the old weights, not the new ones
    assert json.loads((tmp_path / "out" / "config.json").read_text()) == {}  # and the old config beside them
    assert mine.exists()


def test_a_killed_writes_temporaries_go_with_the_next_write_into_that_folder(tmp_path):
    from model import DistilRNN, RNNConfig
    mine = user_folder(tmp_path / "out")
    (tmp_path / "out" / ".draft.tmp").write_text("the user's own")
    live = tmp_path / "out" / f".config.json.{os.getpid()}-abcdefgh.tmp"  # a write in progress, by a live process
    live.write_text("")
    assert subprocess.run([sys.executable, "-c", CRASH_MID_SAVE.format(root=str(ROOT))], cwd=tmp_path).returncode == 9
    stale = {p.name for p in (tmp_path / "out").glob(".*.tmp")} - {".draft.tmp", live.name}
    assert {name.split(".")[1] for name in stale} == {"model", "config"}  # what the kill left
    checkpoints.save_checkpoint(tmp_path / "out", "model.safetensors", DistilRNN(RNNConfig(hidden=8)).state_dict(),
                                {"config.json": {}})
    assert sorted(p.name for p in (tmp_path / "out").glob(".*.tmp")) == sorted([".draft.tmp", live.name])
    assert mine.exists()


@pytest.mark.parametrize("umask", [0o022, 0o077])
def test_written_files_and_folders_follow_the_umask(tmp_path, umask):
    result = subprocess.run([sys.executable, str(ROOT / "run.py"), "rnn", *TINY_RNN], cwd=tmp_path,
                            capture_output=True, text=True, preexec_fn=lambda: os.umask(umask),
                            env=os.environ | {"PYTHONPATH": str(ROOT)})
    assert result.returncode == 0, result.stderr
    for path in ("models/rnn/model.safetensors", "models/rnn/config.json", "plots/rnn_acc.png", "tuning/rnn.jsonl"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o666 & ~umask, path
    for path in ("models", "models/rnn", "plots"):
        assert (tmp_path / path).stat().st_mode & 0o777 == 0o777 & ~umask, path


def test_replacing_a_file_keeps_its_mode(tmp_path):
    path = tmp_path / "log.jsonl"
    path.write_text("")
    path.chmod(0o640)
    runlog.write_jsonl_record(path, {"a": 1})
    assert path.stat().st_mode & 0o777 == 0o640


def test_writing_through_a_symbolic_link_replaces_its_target_and_keeps_the_link(tmp_path):
    (tmp_path / "real").mkdir()
    (tmp_path / "real" / "notes.md").write_text("old")
    (tmp_path / "notes.md").symlink_to(tmp_path / "real" / "notes.md")
    utils.write_text(tmp_path / "notes.md", "new")
    assert (tmp_path / "notes.md").is_symlink() and (tmp_path / "real" / "notes.md").read_text() == "new"


def test_a_bad_line_in_a_log_is_skipped_with_a_warning(tmp_path, capsys):
    log = tmp_path / "rnn.jsonl"
    log.write_text('{"id": 1}\n{"id": 2, "cut sh\n[1, 2]\n{"id": 3}\n')
    assert runlog.read_jsonl(log) == [{"id": 1}, {"id": 3}]
    assert capsys.readouterr().err.splitlines() == [f"warning: {log}:2: not a JSON record, ignored",
                                                    f"warning: {log}:3: not a JSON record, ignored"]
    runlog.write_jsonl_record(log, {"id": 3, "new": True}, key="id")
    assert runlog.read_jsonl(log)[-1] == {"id": 3, "new": True} and len(runlog.read_jsonl(log)) == 2


def test_the_log_lock_leaves_no_file(tmp_path):
    runlog.write_jsonl_record(tmp_path / "tuning" / "rnn.jsonl", {"a": 1})
    runlog.write_jsonl_record(tmp_path / "tuning" / "rnn.jsonl", {"a": 2})
    assert [p.name for p in (tmp_path / "tuning").iterdir()] == ["rnn.jsonl"]
    assert runlog.read_jsonl(tmp_path / "tuning" / "rnn.jsonl") == [{"a": 1}, {"a": 2}]


def test_a_failed_download_leaves_no_empty_folder(tmp_path, monkeypatch):
    def offline(url, dest):
        raise utils.UserError("could not download")

    monkeypatch.setattr(data, "download", offline)
    with pytest.raises(utils.UserError):
        data.ensure_cola(tmp_path / "data" / "cola")
    assert list(tmp_path.iterdir()) == []
    user_folder(tmp_path / "mine")
    with pytest.raises(utils.UserError):
        data.ensure_cola(tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["thesis.tex"]


def test_sigterm_stops_like_ctrl_c_and_resume_gives_the_same_weights(resumable_run, tmp_path, monkeypatch, capfd):
    args, reference = resumable_run
    proc = start_run(args, tmp_path, stderr=subprocess.PIPE)
    state, log = tmp_path / "adapter.resume.pt", tmp_path / "tuning" / "LoRA.jsonl"
    deadline = time.time() + 300
    while not (state.exists() and log.exists()) and proc.poll() is None and time.time() < deadline:
        time.sleep(0.005)
    proc.send_signal(signal.SIGTERM)  # after epoch 1: its state is saved, its plots and log line are written
    stderr = proc.communicate(timeout=120)[1]
    assert proc.returncode == 143, stderr
    saved_epoch = torch.load(state, weights_only=True)["epoch"]
    assert stderr == (f"error: terminated (SIGTERM) during epoch {saved_epoch + 1}; the state after epoch "
                      f"{saved_epoch} is in adapter.resume.pt; rerun the same command with --resume to continue\n")
    resumed = run_main(*args, "--resume", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert resumed.returncode == 0, resumed.stderr
    assert_same_weights(reference, tmp_path)


def test_sigterm_handler_is_removed_after_the_run():
    before = signal.getsignal(signal.SIGTERM)
    assert run.main(["rnn", "--epochs", "0", "--rnn_hidden", "8"]) == 0
    assert signal.getsignal(signal.SIGTERM) is before


def rank_fails_while_saving(rank, port, workdir):
    """One rank of an rnn run (spawned) in which rank 0 cannot save the student."""
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE="2",
                      LOCAL_RANK=str(rank), OMP_NUM_THREADS="1")
    os.chdir(workdir)
    import run

    def disk_full(*args):
        raise OSError(28, "No space left on device")

    checkpoints.save_student = disk_full
    code = run.main(["rnn", *TINY_RNN])
    Path(workdir, f"rank{rank}.json").write_text(json.dumps({"code": code}))


def test_a_rank_0_failure_while_saving_stops_the_other_ranks(tmp_path):
    context = torch.multiprocessing.spawn(rank_fails_while_saving, args=(free_port(), tmp_path), nprocs=2, join=False)
    for _ in range(36):  # a hang guard: both ranks end within three minutes, or the test fails
        if context.join(timeout=5):
            break
    else:
        pytest.fail("a rank is still waiting for rank 0")
    assert [json.loads((tmp_path / f"rank{r}.json").read_text())["code"] for r in range(2)] == [1, 1]


def test_help_shows_every_default():
    parser = run.build_parser()
    [sub] = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    for mode, subparser in sub.choices.items():
        text = " ".join(subparser.format_help().split())
        for action in subparser._actions:
            if action.default is None or action.default is False or action.default is argparse.SUPPRESS:
                assert action.help, (mode, action.option_strings)  # says what it falls back to
            elif action.option_strings:
                assert " ".join(f"(default: {action.default})".split()) in text, (mode, action.option_strings)
