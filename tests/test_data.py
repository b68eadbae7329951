"""CoLA parsing on the real files, malformed files, batching, and the metrics against scikit-learn."""
import pytest
from sklearn.metrics import matthews_corrcoef as sk_mcc
import torch

from conftest import COLA_DEV, COLA_DEV_ACCEPTABLE, COLA_OOD, COLA_TRAIN
from textdata.batches import bucketed_batches, sorted_batches
from textdata.readers import load_cola, read_cola_tsv
from training.metrics import majority_label, matthews_corrcoef
from utils import UserError


def test_real_cola_files_parse(cola_dir):
    data = load_cola(cola_dir)
    assert {k: len(v[0]) for k, v in data.items()} == {"train": COLA_TRAIN, "dev": COLA_DEV, "ood": COLA_OOD}
    for sentences, labels in data.values():
        assert set(labels) == {0, 1} and len(sentences) == len(labels)
    assert 'Susan whispered "Shut up".' in data["train"][0]


def test_majority_baseline_on_real_dev(cola_dir):
    data = load_cola(cola_dir)
    assert majority_label(data["train"][1]) == 1
    assert sum(data["dev"][1]) == COLA_DEV_ACCEPTABLE  # always "acceptable": 69.26%, beside every result


def test_windows_line_endings_and_trailing_blank_line(tmp_path):
    path = tmp_path / "x.tsv"
    path.write_bytes(b'a\t1\t\tIt "works".\r\nb\t0\t*\tWorks it.\r\n\r\n')
    assert read_cola_tsv(path) == (['It "works".', "Works it."], [1, 0])


@pytest.mark.parametrize("content, message", [
    (b"a\t1\t\tfine\nb\t1\tonly three\n", "x.tsv:2: expected 4 tab-separated columns, found 3"),
    (b"a\t2\t\tbad label\n", "x.tsv:1: label must be 0 or 1, found '2'"),
    (b"", "x.tsv: no rows"),
    (b"a\t1\t\tok\nb\t1\t\tcaf\xe9\n", "x.tsv:2: not UTF-8 text"),
    (b"a\t1\t\tok\nb\t0\t*\t \n", "x.tsv:2: the sentence is empty"),
])
def test_malformed_files_name_the_place(tmp_path, content, message):
    path = tmp_path / "x.tsv"
    path.write_bytes(content)
    with pytest.raises(UserError, match=message.replace("(", r"\(").replace(")", r"\)")):
        read_cola_tsv(path)


@pytest.mark.parametrize("seed", range(5))
def test_mcc_matches_scikit_learn(seed):
    g = torch.Generator().manual_seed(seed)
    labels = torch.randint(0, 2, (200,), generator=g)
    preds = torch.where(torch.rand(200, generator=g) < 0.7, labels, 1 - labels)
    assert matthews_corrcoef(preds, labels) == pytest.approx(sk_mcc(labels, preds), abs=1e-12)
    assert matthews_corrcoef(torch.ones(200), labels) == 0.0


def test_batches_cover_every_sentence_once_with_little_padding():
    g = torch.Generator().manual_seed(0)
    lengths = torch.randint(2, 46, (1000,), generator=g).tolist()
    batches = bucketed_batches(lengths, 32, g)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    padded = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    assert padded / sum(lengths) < 1.15
    assert sorted(i for b in sorted_batches(lengths, 32) for i in b) == list(range(1000))
