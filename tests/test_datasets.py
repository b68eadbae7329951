"""Datasets other than CoLA and more than two classes: a local CSV folder and its save_to_disk twin read alike, every
mode runs end to end on them, the head, the KD loss and the metrics are n-class, label names travel with the model,
and a hub id is the same load_dataset call with a name instead of files."""
import csv
import json
import random

import pytest
from sklearn.metrics import f1_score
from sklearn.metrics import matthews_corrcoef as sk_mcc
import torch

from conftest import PAD_BATCH, padded, run_cli, run_main
from model import GPTClassifier
import run
from textdata.batches import Split
from textdata.readers import DataSpec, encode, load_text_data, read_sentences
from train_utils import cross_entropy, predict_logits, train_epoch
from training import checkpoints
from training.metrics import bootstrap, macro_f1, macro_f1_rows, matthews_corrcoef
from utils import UserError

TOPICS = {"sport": ["goal", "match", "team", "coach", "league"], "tech": ["chip", "code", "robot", "laptop", "server"],
          "food": ["bread", "soup", "salad", "pasta", "cheese"]}
SIZES = {"train": 48, "validation": 24, "test": 24}


def three_class_rows(n, rng):
    """`n` (sentence, topic) rows: a topic word in a varied frame, so the topic is learnable from the words."""
    frames = ["I read about the {} today.", "The {} was all anyone talked about.", "Nobody expected the {} {}.",
              "What a {} that was, number {}."]
    rows = []
    for i in range(n):
        topic = sorted(TOPICS)[i % 3]
        rows.append((rng.choice(frames).format(rng.choice(TOPICS[topic]), i), topic))
    return rows


@pytest.fixture(scope="module")
def three_class(tmp_path_factory):
    """(csv folder, save_to_disk folder) holding the same 3-class data; the second with a ClassLabel feature."""
    import datasets
    rng = random.Random(0)
    root = tmp_path_factory.mktemp("three")
    csv_dir, disk_dir = root / "topics-csv", root / "topics-disk"
    csv_dir.mkdir()
    rows = {split: three_class_rows(n, rng) for split, n in SIZES.items()}
    for split, split_rows in rows.items():
        with open(csv_dir / f"{split}.csv", "w", newline="") as f:
            csv.writer(f).writerows([("sentence", "label"), *split_rows])
    features = datasets.Features({"sentence": datasets.Value("string"),
                                  "label": datasets.ClassLabel(names=sorted(TOPICS))})
    datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"sentence": [s for s, _ in r], "label": [sorted(TOPICS).index(t) for _, t in r]}, features=features)
        for split, r in rows.items()}).save_to_disk(str(disk_dir))
    return csv_dir, disk_dir


def test_csv_folder_and_save_to_disk_folder_read_alike(three_class, tmp_path, monkeypatch):
    csv_dir, disk_dir = three_class
    a, b = load_text_data(DataSpec(dataset=str(csv_dir))), load_text_data(DataSpec(dataset=str(disk_dir)))
    assert a.splits == b.splits and a.labels == b.labels == ("food", "sport", "tech")
    assert {k: len(v[0]) for k, v in a.splits.items()} == {"train": 48, "dev": 24, "ood": 24}
    assert a.titles == {"dev": "validation", "ood": "test"} and not a.notes
    monkeypatch.chdir(tmp_path)
    runs = {}
    for folder in three_class:
        assert run.main(["rnn", "--dataset", str(folder), "--epochs", "2", "--rnn_hidden", "16", "--batch_size",
                         "8", "--model_path", f"models/{folder.name}"]) == 0
        runs[folder.name] = json.loads((tmp_path / "tuning" / f"rnn-{folder.name}.jsonl").read_text())
    first, second = runs.values()
    for key in ("data", "dev_acc", "dev_mcc", "dev_f1", "dev_f1_ci", "ood_acc", "ood_mcc", "ood_f1", "dev_preds"):
        assert first[key] == second[key], key
    assert (tmp_path / "plots" / f"rnn-{csv_dir.name}_acc.png").exists()


def test_every_mode_runs_on_a_three_class_folder(three_class, tiny_gpt_dir, tmp_path, monkeypatch, capsys):
    from transformers import GPT2ForSequenceClassification
    csv_dir, _ = three_class
    monkeypatch.chdir(tmp_path)
    data = ["--dataset", str(csv_dir), "--batch_size", "8"]
    student = ["--epochs", "1", "--rnn_hidden", "16", *data]
    assert run.main(["LoRA", "--gpt_variant", tiny_gpt_dir, "--epochs", "2", "--dtype", "float32",
                     "--model_path", "adapter", *data]) == 0
    out = capsys.readouterr().out
    assert f"LoRA on {csv_dir}: best epoch" in out and "macro-F1" in out
    info = json.loads((tmp_path / "adapter" / "run_info.json").read_text())
    assert info["labels"] == ["food", "sport", "tech"] and info["dataset"] == "topics-csv"
    assert run.main(["rnn", *student]) == 0
    assert run.main(["distil", "--model_path", "adapter", *student]) == 0
    report = capsys.readouterr().out
    assert "Distillation report on" in report and "student without KD" in report
    assert (tmp_path / "plots" / "summary-topics-csv.png").exists()
    assert list((tmp_path / "models" / "cache").glob("teacher-topics-csv-*.safetensors"))

    assert run.main(["predict", "--model_path", "adapter", "--input", str(csv_dir / "test.csv"),
                     "--format", "jsonl", "--dtype", "float32"]) == 0
    captured = capsys.readouterr()
    rows = [json.loads(line) for line in captured.out.splitlines()]
    assert len(rows) == 24 and all(r["label"] in TOPICS and 1 / 3 <= r["p"] <= 1 for r in rows)
    assert "on 24 labelled sentences" in captured.err and "macro-F1" in captured.err
    assert run.main(["predict", "--model_path", "models/rnn", "--dataset", str(csv_dir)]) == 0
    assert "on 24 labelled sentences" in capsys.readouterr().out

    assert run.main(["export", "--model_path", "adapter", "--out", "exported"]) == 0
    theirs = GPT2ForSequenceClassification.from_pretrained(tmp_path / "exported").eval()
    assert theirs.config.num_labels == 3 and theirs.config.id2label == {0: "food", 1: "sport", 2: "tech"}
    ours = checkpoints.load_lora_classifier("adapter")
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        assert (theirs(input_ids=ids).logits - ours(ids, lengths)).abs().max() <= 1e-4


def test_a_sweep_on_another_dataset_has_its_own_log_and_summary(three_class, tmp_path):
    csv_dir, _ = three_class
    result = run_cli("tune", "rnn", "--dataset", csv_dir, "--seeds", 1, 2, "--grid", "lr=0.001,0.003", "--epochs",
                     1, "--rnn_hidden", 8, "--batch_size", 8, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert len((tmp_path / "tuning" / "rnn-topics-csv.jsonl").read_text().splitlines()) == 4
    summary = (tmp_path / "tuning" / "rnn-topics-csv_lr-0.001-0.003.md").read_text()
    assert f"(rnn on {csv_dir})" in summary and "| test accuracy |" in summary
    assert not (tmp_path / "tuning" / "rnn.jsonl").exists()


def test_distil_refuses_a_teacher_of_another_label_set(three_class, tiny_gpt_dir, tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    assert run.main(["LoRA", "--gpt_variant", tiny_gpt_dir, "--epochs", "1", "--max_examples", "16",
                     "--model_path", "cola-adapter"]) == 0
    capsys.readouterr()
    assert run.main(["distil", "--model_path", "cola-adapter", "--dataset", str(three_class[0]), "--epochs", "1"]) == 1
    assert capsys.readouterr().err.startswith(
        f"error: cola-adapter: the teacher was trained on CoLA with labels ['unacceptable', 'acceptable'], not on "
        f"{three_class[0]} with labels ['food', 'sport', 'tech']")


def test_a_tiny_model_overfits_48_sentences_of_three_classes(three_class, tiny_gpt_dir, tokenizer):
    sentences, labels = load_text_data(DataSpec(dataset=str(three_class[0]))).splits["train"]
    tokens = encode(tokenizer, sentences)
    torch.manual_seed(0)
    model = GPTClassifier.from_pretrained(tiny_gpt_dir, labels=("food", "sport", "tech"))
    split, cpu = Split(tokens, torch.tensor(labels)), torch.device("cpu")
    optimizer = torch.optim.Adam(model.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        train_epoch(model, split, cross_entropy, optimizer, batch_size=16,
                    generator=g, device=cpu, dtype=torch.float32)
    preds = predict_logits(model, tokens, batch_size=48, device=cpu, dtype=torch.float32).argmax(-1)
    assert model.score.out_features == 3 and torch.equal(preds, split.labels)


@pytest.mark.parametrize("seed, n_classes", [(0, 3), (1, 4), (2, 6), (3, 2)])
def test_multiclass_mcc_and_macro_f1_match_scikit_learn(seed, n_classes):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, n_classes, (300,), generator=g)
    preds = torch.where(torch.rand(300, generator=g) < 0.5, labels, torch.randint(0, n_classes, (300,), generator=g))
    assert matthews_corrcoef(preds, labels) == pytest.approx(sk_mcc(labels, preds), abs=1e-12)
    assert macro_f1(preds, labels) == pytest.approx(f1_score(labels, preds, average="macro"), abs=1e-12)
    low, high = bootstrap(macro_f1_rows, preds, labels)
    assert low < macro_f1(preds, labels) < high
    assert matthews_corrcoef(torch.zeros(300), labels) == 0.0


def test_a_hub_id_is_the_same_load_dataset_call_with_a_name(monkeypatch):
    import datasets
    calls = []
    glue = datasets.DatasetDict({split: datasets.Dataset.from_dict(
        {"sentence": ["a fine film .", "dull ."], "label": labels, "idx": [0, 1]},
        features=datasets.Features({"sentence": datasets.Value("string"), "idx": datasets.Value("int32"),
                                    "label": datasets.ClassLabel(names=["negative", "positive"])}))
        for split, labels in (("train", [1, 0]), ("validation", [1, 0]), ("test", [-1, -1]))})
    monkeypatch.setattr(datasets, "load_dataset", lambda *args, **kwargs: calls.append((args, kwargs)) or glue)
    data = load_text_data(DataSpec(dataset="nyu-mll/glue", dataset_config="sst2"))
    assert calls == [(("nyu-mll/glue", "sst2"), {})]
    assert data.labels == ("negative", "positive") and "ood" not in data.splits
    assert data.notes == ["the test split has no labels: no second evaluation"]


def test_an_uncached_hub_name_offline_is_one_line(tmp_path, monkeypatch, capfd):
    result = run_main("rnn", "--dataset", "no-such-org/no-such-dataset", "--epochs", 1, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 1 and result.stderr.count("\n") == 1
    assert result.stderr.startswith("error: could not load dataset 'no-such-org/no-such-dataset'")


def test_unlabelled_rows_are_left_out_and_said_so(tmp_path):
    (tmp_path / "d").mkdir()
    for split, labels in (("train", ["a", "b", "a"]), ("dev", ["a", "", "b"]), ("test", ["", "", ""])):
        (tmp_path / "d" / f"{split}.jsonl").write_text("".join(
            json.dumps({"text": f"row {i}", "labels": y or None}) + "\n" for i, y in enumerate(labels)))
    data = load_text_data(DataSpec(dataset=str(tmp_path / "d")))
    assert data.splits["dev"] == (["row 0", "row 2"], [0, 1]) and "ood" not in data.splits
    assert data.notes == ["1 unlabelled rows of dev left out", "the test split has no labels: no second evaluation"]
    with pytest.raises(UserError, match=r"--test_split nope: no such split \(there are: dev, test, train\)"):
        load_text_data(DataSpec(dataset=str(tmp_path / "d"), test_split="nope"))


def test_a_numeric_label_column_with_an_empty_cell_keeps_its_labels(tmp_path):
    """A CSV column of 0/1 with one empty cell is read as floats: its labels are still '0' and '1'."""
    (tmp_path / "d").mkdir()
    for split in ("train", "validation"):
        (tmp_path / "d" / f"{split}.csv").write_text("sentence,label\nGood.,1\nBad.,0\nUnknown.,\n")
    data = load_text_data(DataSpec(dataset=str(tmp_path / "d")))
    assert data.labels == ("0", "1") and data.splits["dev"] == (["Good.", "Bad."], [1, 0])
    (tmp_path / "some.csv").write_text("sentence,label\nGood.,1\nUnknown.,\nBad.,0\n")
    assert read_sentences(input_path=tmp_path / "some.csv") == (["Good.", "Unknown.", "Bad."], ["1", None, "0"])


def test_a_headed_four_column_tsv_is_a_table_not_cola(tmp_path):
    path = tmp_path / "four.tsv"
    path.write_text("id\tsentence\tlabel\tsource\n1\tGood.\t1\tme\n2\tBad.\t0\tme\n")
    assert read_sentences(input_path=path) == (["Good.", "Bad."], ["1", "0"])
    cola = tmp_path / "cola.tsv"
    cola.write_text("src\t1\t\tGood.\nsrc\t0\t*\tBad.\n")
    assert read_sentences(input_path=cola) == (["Good.", "Bad."], ["acceptable", "unacceptable"])


def test_plain_lines_split_at_line_ends_only(tmp_path):
    path = tmp_path / "lines.txt"
    path.write_bytes("one\u2028still one\x0cand\r\ntwo\rthree\n".encode())
    assert read_sentences(input_path=path) == (["one\u2028still one\x0cand", "two", "three"], None)
