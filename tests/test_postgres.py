"""`tune --search optuna` on a real PostgreSQL server (the `postgres` fixture): workers that share nothing but the
database share one study, a killed worker's trial is failed by the heartbeat and run again by another, and a
storage that cannot be opened is one line with its password hidden, nothing written."""
import collections
import json
import os
import signal
import subprocess
import sys
import time

import optuna
import pytest

from cli import optuna_search as search
from conftest import ROOT, free_port, run_main

SEARCH = ["tune", "rnn", "--search", "optuna", "--sampler", "random", "--max_examples", 32, "--rnn_hidden", 16,
          "--dtype", "float32", "--space", "lr=log:1e-4:3e-3", "--pruner", "none"]
STATE = optuna.trial.TrialState


def records(folder):
    log = folder / "tuning" / "rnn.jsonl"
    return [json.loads(line) for line in log.read_text().splitlines()] if log.exists() else []


def start_worker(command, folder):
    """`python run.py COMMAND` in `folder` (made here), a process of its own; its stderr goes to folder/stderr."""
    folder.mkdir()
    with open(folder / "stderr", "w") as stderr:
        return subprocess.Popen([sys.executable, str(ROOT / "run.py"), *map(str, command)], cwd=folder,
                                env=os.environ | {"PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"},
                                stdout=subprocess.DEVNULL, stderr=stderr)


def test_two_workers_on_a_postgres_study_run_each_configuration_and_seed_once(postgres, tmp_path):
    storage = postgres.database("together")
    command = [*SEARCH, "--trials", 3, "--seeds", 0, 1, "--epochs", 1, "--name", "together", "--storage", storage]
    workers = [start_worker(command, tmp_path / f"node{k}") for k in (1, 2)]  # two nodes: no folder shared
    codes = [w.wait(timeout=600) for w in workers]
    assert codes == [0, 0], [(tmp_path / f"node{k}" / "stderr").read_text()[-2000:] for k in (1, 2)]
    trials = optuna.load_study(study_name="together", storage=storage).trials
    complete = [t for t in trials if t.state == STATE.COMPLETE]
    assert len(complete) == 3 and all(t.user_attrs.get("surplus") for t in trials if t not in complete)
    runs = records(tmp_path / "node1") + records(tmp_path / "node2")
    assert all(records(tmp_path / f"node{k}") for k in (1, 2))  # both workers ran trials
    assert collections.Counter((r["trial"], r["config"]["run"]["seed"]) for r in runs) == {
        (t.number, seed): 1 for t in complete for seed in (0, 1)}
    assert sorted((r["config"]["train"]["lr"], r["config"]["run"]["seed"]) for r in runs) == sorted(
        (t.params["lr"], seed) for t in complete for seed in (0, 1))


def test_a_killed_workers_trial_is_failed_by_the_heartbeat_and_run_by_the_other(postgres, tmp_path, monkeypatch,
                                                                                 capfd):
    storage = postgres.database("killed")
    command = [*SEARCH, "--trials", 2, "--seeds", 0, "--epochs", 2, "--name", "killed", "--storage", storage]
    doomed = start_worker(command, tmp_path / "node1")
    deadline = time.time() + 300
    while not records(tmp_path / "node1"):  # its first epoch is logged: it is inside its trial
        assert doomed.poll() is None and time.time() < deadline, (tmp_path / "node1" / "stderr").read_text()
        time.sleep(0.1)
    doomed.send_signal(signal.SIGKILL)
    doomed.wait()
    monkeypatch.setattr(search, "HEARTBEAT_S", 1)
    monkeypatch.setattr(search, "GRACE_S", 2)  # the killed worker's last heartbeat is stale 2 s on
    (tmp_path / "node2").mkdir()
    other = run_main(*command, cwd=tmp_path / "node2", monkeypatch=monkeypatch, capfd=capfd)
    assert other.returncode == 0, other.stderr
    trials = optuna.load_study(study_name="killed", storage=storage).trials
    [killed] = [t for t in trials if t.state == STATE.FAIL]
    [retry] = [t for t in trials if t.system_attrs.get("failed_trial") == killed.number]
    assert retry.state == STATE.COMPLETE and retry.params == killed.params
    assert sum(t.state == STATE.COMPLETE for t in trials) == 2 and len(trials) == 3
    summary = (tmp_path / "node2" / "tuning" / "killed.md").read_text()
    assert "2 complete trials, 0 pruned, 1 failed, 1 retried" in summary
    assert sorted(r["trial"] for r in records(tmp_path / "node2")) == sorted(
        t.number for t in trials if t.state == STATE.COMPLETE)


@pytest.mark.parametrize("what", ["a wrong password", "a server that does not answer", "a missing database"])
def test_a_storage_that_cannot_be_opened_is_one_line_with_the_password_hidden(postgres, what, tmp_path,
                                                                                monkeypatch, capfd):
    url = {"a wrong password": postgres.url("postgres", password="not-the-password"),
           "a server that does not answer": postgres.url("postgres", port=free_port()),
           "a missing database": postgres.url("no_such_database")}[what]
    result = run_main(*SEARCH, "--trials", 1, "--storage", url, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    password = url.split(":")[2].split("@")[0]
    shown = url.replace(password, "***")
    assert result.stderr.startswith(f"error: --storage {shown}: cannot open the study (OperationalError: ")
    assert password not in result.stderr
    assert list(tmp_path.iterdir()) == []  # nothing written
