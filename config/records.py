"""Run records: one JSON line per run in tuning/<mode>.jsonl, written atomically under a lock, and read back
by one reader that turns any record, of this schema or an earlier one, into typed objects."""
import dataclasses
import hashlib
import json
import os
from pathlib import Path
import sys

from config.fields import config_from_values, is_section
from config.subcommands import SUBCOMMANDS
from utils import write_text

SCHEMA = 2  # 1: the flags as a flat "args" object (before the typed configuration); 2: "config", asdict of it

# What a flag meant in records written before it existed (schema 1): the dataset was CoLA, the task
# classification, the KD loss Hinton's KL.
BEFORE_THE_FLAG = {"dataset": "cola", "task": "classify", "kd_loss": "kl"}
# Flags left unset (None) where they apply to nothing, which records written before hold there with their default,
# read as unset so that such a run compares equal to the same run made now: per subcommand, {flag: (the flag it
# applies with, that flag's values where it does not apply)}.
APPLIED_TO_NOTHING = {"distil": {"temperature": ("kd_loss", ("mse",)),
                                 **{rate: ("augment", (0,)) for rate in ("p_mask", "p_replace", "p_ngram")}}}


def write_jsonl_record(path, record, key=None):
    """Add `record` as one JSON line to `path`, replacing the line whose `key` field has the same value if there is
    one. The file is rewritten atomically (a crash never leaves half a line) under a lock on its folder, so that
    runs side by side (tune --parallel) never lose each other's lines; the lock leaves no file behind."""
    import fcntl
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
        if key is not None:
            lines = [line for line in lines if (json_record(line) or {}).get(key) != record[key]]
        write_text(path, "".join(line + "\n" for line in lines) + json.dumps(record) + "\n")
    finally:
        os.close(fd)  # releases the lock


def read_jsonl(path):
    """The records of a JSONL log. A line that is not a JSON object (a log edited by hand, or cut short by a full
    disk) is skipped with a warning, so that one bad line does not stop every later run."""
    if not Path(path).exists():
        return []
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        record = json_record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            print(f"warning: {path}:{number}: not a JSON record, ignored", file=sys.stderr)
    return records


def json_record(line):
    """The JSON object on `line`, or None if it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def record_id(line):
    """A record's short stable id: the run id training runs and gen are logged with, or (a record from before) a hash
    of its content."""
    return line.get("run_id") or hashlib.sha256(json.dumps(line, sort_keys=True).encode()).hexdigest()[:12]


def config_fields(config):
    """What a record holds of the run's configuration: its schema, subcommand and every field (asdict)."""
    return {"schema": SCHEMA, "mode": config.MODE, "config": dataclasses.asdict(config)}


def flat(config_dict, cls):
    """asdict's nested form of a `cls` configuration, flat: {field name: value}."""
    sections = {f.name for f in dataclasses.fields(cls) if is_section(f)}
    out = {}
    for name, value in config_dict.items():
        out |= value if name in sections else {name: value}
    return out


@dataclasses.dataclass(frozen=True)
class RunRecord:
    """A run's record read back: its subcommand's typed configuration, whether it finished, and the rest of the
    line (history, scores, predictions...), read as `record["dev_acc"]`."""
    config: object
    finished: bool
    results: dict

    def __getitem__(self, key):
        return self.results[key]

    def __contains__(self, key):
        return key in self.results

    def get(self, key, default=None):
        return self.results.get(key, default)


def read_record(line):
    """The RunRecord of a record's JSON object, of any schema, or None if it is none."""
    cls = SUBCOMMANDS.get(line.get("mode"))
    if cls is None:
        return None
    if line.get("schema", 1) == 1:
        values = BEFORE_THE_FLAG | line.get("args", {})
    else:
        values = flat(line["config"], cls)
    unused = APPLIED_TO_NOTHING.get(cls.MODE, {})
    values = {k: None if k in unused and values.get(unused[k][0]) in unused[k][1] else v for k, v in values.items()}
    results = {k: v for k, v in line.items() if k not in ("schema", "args", "config", "finished")}
    results.setdefault("dev_probs", None)  # runs logged before calibration have no probabilities
    results.setdefault("calibration", None)
    # a record from before unfinished runs were logged is of a finished run
    return RunRecord(config_from_values(cls, values), line.get("finished", True), results)


def read_records(path):
    """The RunRecords of a log; a line that is no record of a known subcommand is skipped with a warning."""
    records = []
    for number, line in enumerate(read_jsonl(path), start=1):
        try:
            record = read_record(line)
        except (TypeError, KeyError, ValueError, AttributeError):
            record = None
        if record is None:
            print(f"warning: {path}: record {number} is not a run record of this project, ignored", file=sys.stderr)
        else:
            records.append(record)
    return records
