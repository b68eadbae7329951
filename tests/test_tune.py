"""`run.py tune`: a sweep through the plain subcommands' code path, resumable, summarized with its plot."""
import json

import pytest

from conftest import run_cli, run_main

SWEEP = ["tune", "rnn", "--seeds", 1, 2, "--grid", "lr=0.001,0.003", "--max_examples", 128, "--epochs", 1,
         "--rnn_hidden", 16, "--name", "small"]


def test_sweep_writes_every_run_the_summary_and_the_plot_and_reruns_nothing(tmp_path, monkeypatch, capfd):
    first = run_cli(*SWEEP, cwd=tmp_path)
    assert first.returncode == 0, first.stderr
    runs = [json.loads(line) for line in (tmp_path / "tuning" / "rnn.jsonl").read_text().splitlines()]
    assert sorted((r["config"]["train"]["lr"], r["config"]["run"]["seed"]) for r in runs) == [(0.001, 1), (0.001, 2), (0.003, 1),
                                                                          (0.003, 2)]
    summary = (tmp_path / "tuning" / "small.md").read_text()
    assert "| lr=0.001 | 2 |" in summary and "| lr=0.003 | 2 |" in summary and "Best by mean dev accuracy" in summary
    assert "McNemar" in summary and "vs the majority class" in summary
    assert (tmp_path / "plots" / "tune_small.png").read_bytes()[:4] == b"\x89PNG"
    again = run_main(*SWEEP, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert again.returncode == 0, again.stderr
    assert again.stdout.count("skipped") == 4 and "epoch" not in again.stdout
    assert len((tmp_path / "tuning" / "rnn.jsonl").read_text().splitlines()) == 4
    longer = run_main(*[2 if a == 1 and SWEEP[i - 1] == "--epochs" else a for i, a in enumerate(SWEEP)],
                      cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert longer.returncode == 0 and "skipped" not in longer.stdout  # other epochs: other runs
    assert len((tmp_path / "tuning" / "rnn.jsonl").read_text().splitlines()) == 8
    assert len(list((tmp_path / "models" / "tune" / "small").iterdir())) == 4  # one model per configuration and seed


def test_a_bad_grid_is_refused_before_anything_runs(tmp_path, monkeypatch, capfd):
    result = run_main("tune", "rnn", "--grid", "no_such_flag=1,2", "--max_examples", 16, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "unrecognized arguments: --no_such_flag 1" in result.stderr
    result = run_main("tune", "rnn", "--grid", "lr=0.1,-1", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and "argument --lr: must be in (0, inf), got -1" in result.stderr
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("args, message", [
    (["--grid", "seed=1,2"], "--grid seed=1,2: seed cannot vary in a sweep (use --seeds)"),
    (["--grid", "lr=0.1", "lr=0.2"], "--grid lr=0.2: lr is given twice"),
    (["--grid", "dataset=a,b"], "--grid dataset=a,b: dataset cannot vary in a sweep (run one sweep per dataset)"),
    (["--seeds", 0, 0], "--seeds 0 0: a seed is given twice"),
    (["--seed", 5], "tune: --seed is set by the sweep (use --seeds)"),
    (["--model_path=models/mine"], "tune: --model_path is set by the sweep (each run writes under models/tune/"),
    (["--epochs", 0], "tune: --epochs 0: a sweep trains, at least 1 epoch"),
])
def test_what_a_sweep_sets_or_cannot_vary_is_refused(tmp_path, monkeypatch, capfd, args, message):
    result = run_main("tune", "rnn", *args, "--max_examples", 16, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert not any(tmp_path.iterdir())


def test_parallel_sweep_runs_side_by_side_without_losing_a_line(tmp_path):
    result = run_cli("tune", "rnn", "--seeds", 3, 4, "--grid", "lr=0.001,0.002", "--parallel", 2,
                     "--max_examples", 64, "--epochs", 1, "--rnn_hidden", 8, "--name", "par", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.count(": done") == 4
    assert len((tmp_path / "tuning" / "rnn.jsonl").read_text().splitlines()) == 4
    assert sorted(p.name for p in (tmp_path / "tuning" / "par-logs").iterdir()) == [
        f"lr_{lr}_seed_{seed}.log" for lr in ("0.001", "0.002") for seed in (3, 4)]  # one per run, by name
    assert "| lr=0.002 | 2 |" in (tmp_path / "tuning" / "par.md").read_text()
