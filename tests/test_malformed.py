"""Files as users have them: data files other tools wrote, hand-edited configs, read-only shared folders. Every
malformed input ends in one line that names what to fix, never in `unexpected <Exception>`; the inputs that are
fine as they are (a test file without labels, a parquet input, a read-only CoLA folder) just work."""
import json
from pathlib import Path
import shutil

import pytest

from config import checks
from conftest import run_main, save_tiny_adapter, save_tiny_gpt2
from model import DistilRNN, RNNConfig
from training.checkpoints import save_student

TRAIN = ["--max_examples", 8, "--epochs", 1, "--rnn_hidden", 8, "--device", "cpu"]
GOOD_CSV = "sentence,label\nA goal.,sport\nSoup.,food\nA match.,sport\nBread.,food\n"

# folder name: {file: content} of a dataset folder (a validation file like the train file unless given)
DATASETS = {
    "mixed-labels": {"train.jsonl": '{"sentence": "A.", "label": 0}\n{"sentence": "B.", "label": "word"}\n'},
    "list-labels": {"train.jsonl": '{"sentence": "A.", "label": [0, 1]}\n{"sentence": "B.", "label": [1]}\n'},
    "dict-labels": {"train.jsonl": '{"sentence": "A.", "label": {"a": 1}}\n{"sentence": "B.", "label": {"b": 2}}\n'},
    "fraction-labels": {"train.jsonl": '{"sentence": "A.", "label": 0.5}\n{"sentence": "B.", "label": 1.5}\n'},
    "nan-labels": {"train.jsonl": '{"sentence": "A.", "label": NaN}\n{"sentence": "B.", "label": 1}\n'},
    "null-text": {"train.jsonl": '{"sentence": null, "label": "a"}\n{"sentence": "B.", "label": "b"}\n'},
    "not-records": {"train.jsonl": '{"sentence": "A.", "label": 1}\n[1, 2]\n'},
    "empty-jsonl": {"train.jsonl": ""},
    "truncated-json": {"train.json": '[{"sentence": "A.", "label": 1}, {"sent'},
    "header-only": {"train.csv": "sentence,label\n", "validation.csv": GOOD_CSV},
    "extra-field": {"train.csv": "sentence,label\nA goal.,sport\nSoup.,food,hot\n"},
    "latin1": {"train.csv": "sentence,label\nCaf\xe9.,a\nB.,b\n".encode("latin-1")},
    "not-parquet": {"train.parquet": b"PAR1 garbage", "validation.parquet": b"PAR1 garbage"},
    "no-label-dev": {"train.csv": GOOD_CSV, "validation.csv": "sentence\nA team.\n"},
    "no-text-test": {"train.csv": GOOD_CSV, "validation.csv": GOOD_CSV, "test.csv": "label\nsport\n"},
    "mixed-suffixes": {"train.csv": GOOD_CSV, "validation.jsonl": '{"sentence": "A.", "label": "sport"}\n'},
    "no-dev": {"train.csv": GOOD_CSV, "other.csv": GOOD_CSV},
}

ADAPTER_EDITS = {"rank-zero": {"r": 0}, "rank-text": {"r": "four"}, "rank-fraction": {"r": 2.5},
                 "alpha-negative": {"lora_alpha": -1}, "alpha-text": {"lora_alpha": "big"},
                 "targets-number": {"target_modules": 5}, "targets-empty": {"target_modules": []},
                 "base-number": {"base_model_name_or_path": 5}, "no-rank": {"r": None}}
STUDENT_EDITS = {"layers-zero": {"layers": 0}, "hidden-negative": {"hidden": -3}, "hidden-text": {"hidden": "big"},
                 "cell-unknown": {"cell": "transformer"}, "labels-one": {"labels": ["a"]},
                 "labels-text": {"labels": "ab"}, "labels-twice": {"labels": ["a", "a"]},
                 "vocab-small": {"vocab_size": 10}, "not-student": {"model_type": "GPT2"}}
INPUTS = {"garbage.parquet": b"PAR1 not parquet", "empty.csv": b"", "header.csv": b"sentence,label\n",
          "lists.jsonl": b'{"sentence": "A.", "label": [1]}\n', "no-text.csv": b"label\n1\n",
          "truncated.json": b'[{"sentence": "A.", "lab', "latin1.txt": "Caf\xe9\n".encode("latin-1")}


def edited_config(folder, name, edits):
    path = Path(folder) / name
    cfg = json.loads(path.read_text())
    path.write_text(json.dumps({k: v for k, v in (cfg | edits).items() if v is not None}))


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    """A folder of malformed inputs, and the commands (after `python run.py`) that read each."""
    d = tmp_path_factory.mktemp("corpus")
    commands = []
    for folder, files in DATASETS.items():
        (d / folder).mkdir()
        train = next(name for name in files if name.startswith("train"))
        if not any(name.startswith(("validation", "other")) for name in files):
            files = files | {train.replace("train", "validation"): files[train]}
        for name, content in files.items():
            (d / folder / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        commands.append(["rnn", "--dataset", folder, *TRAIN])
    save_tiny_gpt2(d / "tiny-gpt2")
    for folder, edits in ADAPTER_EDITS.items():
        save_tiny_adapter(d / folder, str(d / "tiny-gpt2"), base_model="tiny-gpt2", run_info={})
        edited_config(d / folder, "adapter_config.json", edits)
        commands.append(["predict", "--model_path", folder, "--sentence", "Hi."])
    for folder, edits in STUDENT_EDITS.items():
        save_student(DistilRNN(RNNConfig(hidden=8, layers=1)), d / folder, {})
        edited_config(d / folder, "config.json", edits)
        commands.append(["predict", "--model_path", folder, "--sentence", "Hi."])
    save_student(DistilRNN(RNNConfig(hidden=8, layers=1)), d / "student", {})
    for name, content in INPUTS.items():
        (d / name).write_bytes(content)
        commands.append(["predict", "--model_path", "student", "--input", name])
    commands += [["rnn", "--lr", "nan", *TRAIN], ["rnn", "--clip", "inf", *TRAIN], ["gen", "--temperature", "inf"],
                 ["distil", "--alpha", "nan"], ["gen", "--top_p", "1e400"]]
    return d, commands


def test_every_malformed_input_ends_in_one_line_that_is_not_unexpected(corpus, monkeypatch, capfd):
    folder, commands = corpus
    before = {p: p.read_bytes() for p in folder.rglob("*") if p.is_file()}
    failures = []
    for command in commands:
        result = run_main(*command, cwd=folder, monkeypatch=monkeypatch, capfd=capfd)
        one_line = result.stderr.count("\n") == 1 and result.stderr.startswith("error: ")
        if result.returncode == 0 or not one_line or "unexpected" in result.stderr:
            failures.append(f"{' '.join(map(str, command))}: exit {result.returncode}: {result.stderr!r}")
    assert failures == []
    assert {p: p.read_bytes() for p in before} == before  # the inputs as they were


def test_a_test_file_without_labels_means_no_second_evaluation(tmp_path, monkeypatch, capfd):
    (tmp_path / "data").mkdir()
    for name in ("train.csv", "validation.csv"):
        (tmp_path / "data" / name).write_text(GOOD_CSV)
    (tmp_path / "data" / "test.csv").write_text("sentence\nA coach.\n")
    result = run_main("rnn", "--dataset", "data", *TRAIN, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert "note: the test split has no labels: no second evaluation" in result.stdout
    [record] = [json.loads(line) for line in (tmp_path / "tuning" / "rnn-data.jsonl").read_text().splitlines()]
    assert "ood_acc" not in record and record["dev_acc"] >= 0


def test_predict_reads_a_parquet_input(tmp_path, monkeypatch, capfd):
    import datasets
    save_student(DistilRNN(RNNConfig(hidden=8, layers=1)), tmp_path / "student", {})
    sentences = ["The cat sat.", "Sat cat the.", "A sentence with ünïcode."]
    datasets.Dataset.from_dict({"sentence": sentences, "label": ["acceptable", "unacceptable", "acceptable"]}
                               ).to_parquet(str(tmp_path / "s.parquet"))
    result = run_main("predict", "--model_path", "student", "--input", "s.parquet", "--format", "jsonl",
                      cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines() if line.startswith("{")]
    assert [r["sentence"] for r in rows] == sentences


def test_a_read_only_cola_folder_is_fine_and_one_without_the_files_is_refused(tmp_path, cola_dir, monkeypatch,
                                                                               capfd):
    shared, empty = tmp_path / "shared-cola", tmp_path / "empty-cola"
    shutil.copytree(cola_dir, shared)
    empty.mkdir()
    before = {p: p.read_bytes() for p in shared.iterdir()}
    writable = checks.writable  # root can write anywhere: what a read-only mount says is stood in for here
    monkeypatch.setattr(checks, "writable", lambda path: writable(path) and not str(Path(path).absolute()).startswith(
        (str(shared), str(empty))))
    result = run_main("rnn", "--data_dir", shared, *TRAIN, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert {p: p.read_bytes() for p in shared.iterdir()} == before
    refused = run_main("rnn", "--data_dir", empty, *TRAIN, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert refused.returncode == 2
    assert refused.stderr.startswith(f"error: --data_dir {empty}: cannot write there")
