"""`run.py tune --search optuna`: trials drawn by Optuna's seeded samplers, run per seed through the plain
subcommand, shared by workers through one study, pruned, retried after a killed worker, summarized."""
import collections
import json
import os
import signal
import statistics
import subprocess
import sys
import time

import optuna
import pytest

from cli import optuna_search as search
from conftest import ROOT, run_main
import train_utils

SEARCH = ["tune", "rnn", "--search", "optuna", "--sampler", "random", "--max_examples", 32, "--rnn_hidden", 16,
          "--dtype", "float32"]
LR = ["--space", "lr=log:1e-4:3e-3", "--pruner", "none"]
STATE = optuna.trial.TrialState


def records(folder):
    return [json.loads(line) for line in (folder / "tuning" / "rnn.jsonl").read_text().splitlines()]


def load_study(folder, name):
    return optuna.load_study(study_name=name, storage=f"sqlite:///{folder}/tuning/{name}.db")


def test_a_seeded_search_runs_every_trial_once_per_seed_and_a_rerun_runs_none(tmp_path, monkeypatch, capfd):
    command = [*SEARCH, *LR, "--trials", 4, "--seeds", 0, 1, "--epochs", 1, "--name", "s"]
    first = run_main(*command, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert first.returncode == 0, first.stderr
    runs, trials = records(tmp_path), load_study(tmp_path, "s").trials
    assert [t.state for t in trials] == [STATE.COMPLETE] * 4
    assert sorted((r["trial"], r["config"]["run"]["seed"]) for r in runs) == [(k, s) for k in range(4) for s in (0, 1)]
    for t in trials:  # trial k draws what Optuna's RandomSampler seeded with k draws first
        oracle = optuna.create_study(sampler=optuna.samplers.RandomSampler(seed=t.number)).ask()
        assert t.params["lr"] == oracle.suggest_float("lr", 1e-4, 3e-3, log=True)
        mine = [r for r in runs if r["trial"] == t.number]
        assert all(r["finished"] and r["config"]["train"]["lr"] == t.params["lr"] for r in mine)
        assert t.value == pytest.approx(statistics.mean(r["dev_acc"] for r in mine))
    best = load_study(tmp_path, "s").best_trial
    summary = (tmp_path / "tuning" / "s.md").read_text()
    assert f"Best (the study's best, trial {best.number}): **lr={best.params['lr']:.4g}**" in summary
    assert "4 complete trials, 0 pruned, 0 failed" in summary and "vs the majority class" in summary
    assert (tmp_path / "plots" / "tune_s.png").read_bytes()[:4] == b"\x89PNG"
    again = run_main(*command, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert again.returncode == 0, again.stderr
    assert "epoch" not in again.stdout and len(records(tmp_path)) == 8 and len(load_study(tmp_path, "s").trials) == 4


def test_two_workers_on_one_study_run_each_trial_once(tmp_path):
    command = [sys.executable, str(ROOT / "run.py"), *map(str, SEARCH + LR), "--trials", "6", "--seeds", "0",
               "--epochs", "1", "--name", "shared"]
    env = os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    workers = [subprocess.Popen(command, cwd=tmp_path, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                text=True) for _ in range(2)]
    errors = [w.communicate(timeout=600)[1] for w in workers]
    assert [w.returncode for w in workers] == [0, 0], errors
    trials = load_study(tmp_path, "shared").get_trials(states=(STATE.COMPLETE,))
    per_trial = collections.Counter(r["trial"] for r in records(tmp_path))
    assert len(trials) == 6 and per_trial == {t.number: 1 for t in trials}  # 6 trials x 1 seed, none run twice


def test_a_killed_workers_trial_is_failed_and_run_again_by_the_next(tmp_path, monkeypatch, capfd):
    command = [*SEARCH, *LR, "--trials", 1, "--seeds", 0, "--epochs", 2, "--name", "k"]
    worker = subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, command)], cwd=tmp_path,
                              env=os.environ | {"PYTHONPATH": str(ROOT)}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.DEVNULL)
    log = tmp_path / "tuning" / "rnn.jsonl"
    while not (log.exists() and log.read_text().strip()):  # the first epoch is logged: the trial is running
        assert worker.poll() is None, "the worker ended before its first epoch was logged"
        time.sleep(0.2)
    worker.send_signal(signal.SIGKILL)
    worker.wait()
    monkeypatch.setattr(search, "HEARTBEAT_S", 1)
    monkeypatch.setattr(search, "GRACE_S", 1)  # the killed worker's trial is stale a second after its heartbeat
    result = run_main(*command, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    killed, again = load_study(tmp_path, "k").trials
    assert killed.state == STATE.FAIL and again.state == STATE.COMPLETE
    assert again.system_attrs["failed_trial"] == 0 and again.params == killed.params
    [finished] = records(tmp_path)  # the retry resumed the killed run from its saved epoch: one record, finished
    assert (finished["trial"], finished["finished"], len(finished["history"])) == (1, True, 2)


def test_a_trial_stopped_by_ctrl_c_is_failed_and_queued_again_with_its_flags(tmp_path, monkeypatch, capfd):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(train_utils, "train_epoch", interrupted)
    result = run_main(*SEARCH, *LR, "--trials", 1, "--seeds", 0, "--epochs", 1, "--name", "c", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 130 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: interrupted during epoch 1 of trial 0, which is queued to run again")
    assert "; continue the study with: python run.py tune " in result.stderr
    stopped, queued = load_study(tmp_path, "c").trials
    assert (stopped.state, queued.state) == (STATE.FAIL, STATE.WAITING)
    assert queued.system_attrs["fixed_params"] == stopped.params and queued.user_attrs == {"retry_of": 0}


def test_a_trial_worse_than_the_median_is_pruned_and_never_the_best(tmp_path, monkeypatch, capfd):
    evaluate = train_utils.Classification.evaluate

    def zero_with_batches_of_8(self, model, split, *, batch_size, **kwargs):
        scores = evaluate(self, model, split, batch_size=batch_size, **kwargs)
        return scores | {"acc": 0.0, "score": 0.0} if batch_size == 8 else scores

    monkeypatch.setattr(train_utils.Classification, "evaluate", zero_with_batches_of_8)
    (tmp_path / "tuning").mkdir()
    study = optuna.create_study(study_name="p", storage=f"sqlite:///{tmp_path}/tuning/p.db", direction="maximize")
    for batch_size in ["16"] * 5 + ["8"]:  # the median pruner compares from the sixth trial on
        study.enqueue_trial({"batch_size": batch_size})
    command = [*SEARCH, "--space", "batch_size=cat:16,8", "--pruner", "median", "--trials", 6, "--seeds", 0,
               "--epochs", 2, "--name", "p"]
    result = run_main(*command, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    trials = load_study(tmp_path, "p").trials
    assert [t.state for t in trials] == [STATE.COMPLETE] * 5 + [STATE.PRUNED]
    pruned = [r for r in records(tmp_path) if r["trial"] == 5]
    assert [(r["finished"], r.get("pruned"), len(r["history"])) for r in pruned] == [(False, True, 1)]
    assert sorted(p.name for p in (tmp_path / "models" / "tune" / "p").iterdir()) == ["batch_size_16_seed0"]
    assert load_study(tmp_path, "p").best_trial.params == {"batch_size": "16"}
    summary = (tmp_path / "tuning" / "p.md").read_text()
    assert "5 complete trials, 1 pruned, 0 failed" in summary and "**batch_size=16**" in summary


@pytest.mark.parametrize("args, message", [
    (["--space", "lr=uniform:0:1"], "--space lr=uniform:0:1: expected flag=kind:..., the kind one of log, float"),
    (["--space", "rnn_hidden=int:8:x"], "--space rnn_hidden=int:8:x: expected int:LOW:HIGH, two integers"),
    (["--space", "rnn_cell=cat:rnn,rnn"], "--space rnn_cell=cat:rnn,rnn: a choice is given twice"),
    (["--space", "lr=log:1e-4:1e-3", "lr=float:0.1:0.2"], "--space lr=float:0.1:0.2: lr is given twice"),
    (["--space", "seed=int:0:3"], "--space seed=int:0:3: seed cannot vary in a sweep (use --seeds)"),
    (["--space", "dataset=cat:a,b"], "--space dataset=cat:a,b: dataset cannot vary in a sweep"),
    (["--space", "clip=float:-1:1"], "argument --clip: must be in [0, inf), got -1.0"),
    (["--space", "lr=log:1e-4:1e-3", "--grid", "clip=1,2"], "--grid is for --search grid"),
    (["--space", "lr=log:1e-4:1e-3", "--metric", "perplexity"], "--metric perplexity: rnn runs record no "
     "perplexity"),
    ([], "--search optuna needs --space"),
])
def test_a_bad_search_is_refused_before_anything_runs(tmp_path, monkeypatch, capfd, args, message):
    result = run_main("tune", "rnn", "--search", "optuna", *args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith(f"error: {message}"), result.stderr
    assert not any(tmp_path.iterdir())


def test_the_search_flags_belong_to_the_search_and_need_optuna(tmp_path, monkeypatch, capfd):
    result = run_main("tune", "rnn", "--trials", 3, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.startswith("error: --trials is for --search optuna")
    monkeypatch.setitem(sys.modules, "optuna", None)  # what `import optuna` meets where it is not installed
    result = run_main("tune", "rnn", "--search", "optuna", "--space", "lr=log:1e-4:1e-3", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: --search optuna needs the optuna package: pip install optuna")
    assert not any(tmp_path.iterdir())
