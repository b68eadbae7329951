"""Run records, an adapter and a resume state written before the configuration was typed (schema 1: the flags
as a flat "args" object; tests/fixtures/legacy_runs, made by real short runs, paths relative) are read by the one
reader: a resumed run continues, a sweep skips the runs it finds, distil finds its matching rnn run."""
import json
import os
import shutil

import pytest

from config.records import SCHEMA, read_records
from config.subcommands import DistilConfig, LoRAConfig, RNNConfig
from conftest import ROOT, run_main, save_tiny_gpt2

LEGACY = ROOT / "tests" / "fixtures" / "legacy_runs"


@pytest.fixture
def legacy(tmp_path, cola_dir):
    """A working folder as the old main left it: its tuning/ and models/, the tiny GPT-2 and CoLA beside them."""
    shutil.copytree(LEGACY, tmp_path, dirs_exist_ok=True)
    save_tiny_gpt2(tmp_path / "tiny-gpt2")
    os.symlink(cola_dir, tmp_path / "cola")
    return tmp_path


def test_the_reader_types_every_legacy_record():
    lora = read_records(LEGACY / "tuning" / "LoRA.jsonl")
    assert [type(r.config) for r in lora] == [LoRAConfig, LoRAConfig] and [r.finished for r in lora] == [True, False]
    assert lora[0].config.model.gpt_variant == "tiny-gpt2" and lora[0].config.lora.lora_alpha == 4
    assert lora[0].config.data.train_split == "train"  # schema 1 stored the flag not given as None
    lm = read_records(LEGACY / "tuning" / "LoRA-notes.txt.jsonl")[0]
    assert lm.config.lora.task == "lm" and lm.config.lm.block_size == 32 and lm["dev_perplexity"] > 1
    rnn = read_records(LEGACY / "tuning" / "rnn.jsonl")
    assert {type(r.config) for r in rnn} == {RNNConfig} and {r.config.student.rnn_hidden for r in rnn} == {8}
    distil = read_records(LEGACY / "tuning" / "distil.jsonl")[0]
    assert isinstance(distil.config, DistilConfig) and distil.config.distil.kd_loss == "kl"
    assert distil.config.model_path == "models/LoRA-tiny-gpt2" and len(distil["dev_preds"]) == 527


def test_a_legacy_resume_state_resumes(legacy, monkeypatch, capfd):
    args = ["LoRA", "--gpt_variant", "tiny-gpt2", "--data_dir", "cola", "--max_examples", 64, "--epochs", 2,
            "--batch_size", 16, "--model_path", "models/cut"]
    changed = run_main(*args[:-4], "--epochs", 2, "--batch_size", 32, "--model_path", "models/cut", "--resume",
                       cwd=legacy, monkeypatch=monkeypatch, capfd=capfd)
    assert changed.returncode == 1 and "saved with --batch_size 16, this run has --batch_size 32" in changed.stderr
    resumed = run_main(*args, "--resume", cwd=legacy, monkeypatch=monkeypatch, capfd=capfd)
    assert resumed.returncode == 0, resumed.stderr
    assert "resuming after epoch 1" in resumed.stdout + resumed.stderr
    lines = [json.loads(line) for line in (legacy / "tuning" / "LoRA.jsonl").read_text().splitlines()]
    assert len(lines) == 2 and lines[1]["finished"] and lines[1]["schema"] == SCHEMA  # the unfinished line replaced
    assert [h["epoch"] for h in lines[1]["history"]] == [1, 2]
    assert not (legacy / "models" / "cut.resume.pt").exists()


def test_a_sweep_skips_the_legacy_run_it_would_make(legacy, monkeypatch, capfd):
    result = run_main("tune", "rnn", "--seeds", 0, "--grid", "lr=0.001", "--epochs", 1, "--max_examples", 64,
                      "--rnn_hidden", 8, "--data_dir", "cola", cwd=legacy, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert "lr=0.001 seed=0: already in tuning/rnn.jsonl, skipped" in result.stdout
    assert (legacy / "tuning" / "rnn_lr-0.001.md").exists()


def test_distil_finds_its_legacy_rnn_run(legacy, monkeypatch, capfd):
    result = run_main("distil", "--model_path", "models/LoRA-tiny-gpt2", "--rnn_hidden", 8, "--max_examples", 64,
                      "--epochs", 1, "--data_dir", "cola", "--lr", "0.001", cwd=legacy, monkeypatch=monkeypatch,
                      capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert "student without KD" in result.stdout and "vs student without KD" in result.stdout


def test_a_sweep_skips_the_legacy_distil_run_whose_rates_applied_to_nothing(legacy, monkeypatch, capfd):
    """The legacy record holds --p_mask 0.1 (its default then) for a run without --augment, which now leaves the
    rates unset: the same run all the same. The record is made the sweep's run (its student folder)."""
    log = legacy / "tuning" / "distil.jsonl"
    line = json.loads(log.read_text())
    line["args"]["student_path"] = "models/tune/distil_alpha-0.5/alpha_0.5_seed0"
    log.write_text(json.dumps(line) + "\n")
    result = run_main("tune", "distil", "--seeds", 0, "--grid", "alpha=0.5", "--epochs", 1, "--max_examples", 64,
                      "--rnn_hidden", 8, "--data_dir", "cola", "--model_path", "models/LoRA-tiny-gpt2", cwd=legacy,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert "alpha=0.5 seed=0: already in tuning/distil.jsonl, skipped" in result.stdout
