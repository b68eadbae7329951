"""The transfer set and calibration: Tang et al.'s augmentation at the rates its flags give, seeded; sampling from
GPT-2 seeded and cut at a sentence's end; no held-out sentence in the set; the loss on transfer and original rows
against torch.nn.functional; the teacher's cache of the set; ECE against scikit-learn; temperature scaling; the
report's rows."""
import json
import random

import pytest
import torch
import torch.nn.functional as F

from conftest import COLA_DEV, run_main, save_tiny_gpt2
import run
from config.sections import TransferSettings
from textdata.augmentation import MASK, Unigram, augment, augment_words, normalised
from textdata.readers import load_cola
from textdata.transfer_set import ENDS, sample_sentences, transfer_sentences
from training.kd_loss import kd_loss
from training.metrics import expected_calibration_error, fit_temperature, nll


@pytest.fixture(scope="module")
def cola_train(cola_dir):
    return load_cola(cola_dir)["train"][0]


def ten_thousand(sentences, fewest_words=1):
    usable = [s for s in sentences if len(s.split()) >= fewest_words]
    return [usable[i % len(usable)] for i in range(10_000)]


def test_augmentation_is_the_same_under_a_seed_and_another_under_another(cola_train):
    flags = dict(p_mask=0.1, p_replace=0.1, p_ngram=0.25)
    first = augment(cola_train[:300], 2, seed=0, **flags)
    assert augment(cola_train[:300], 2, seed=0, **flags) == first
    assert augment(cola_train[:300], 2, seed=1, **flags)[0] != first[0]


def test_measured_rates_are_the_flags(cola_train):
    rng, sentences = random.Random(0), ten_thousand(cola_train)
    unigram = Unigram(cola_train)
    masked = replaced = kept = words = 0
    for s in sentences:
        source = s.split()
        out = augment_words(source, rng, unigram, 0.15, 0.2, 0.0)
        masked += sum(w == MASK for w in out)
        replaced += sum(w != MASK and w != v for w, v in zip(out, source))
        kept += sum(w != MASK for w in out)
        words += len(source)
    assert abs(masked / words - 0.15) <= 0.01
    assert abs(replaced / kept - 0.2) <= 0.01  # of the words not masked, as the flag says
    long = ten_thousand(cola_train, fewest_words=6)  # so that every n-gram (n <= 5) is shorter than its sentence
    cut = sum(len(augment_words(s.split(), rng, unigram, 0.0, 0.0, 0.3)) < len(s.split()) for s in long)
    assert abs(cut / len(long) - 0.3) <= 0.01


def test_no_output_equals_its_source_nor_another_output(cola_train):
    sources = ten_thousand(cola_train)
    out, dropped = augment(sources, 1, p_mask=0.1, p_replace=0.1, p_ngram=0.25, seed=0)
    keys = [normalised(s) for s in out]
    assert len(set(keys)) == len(keys) and not set(keys) & {normalised(s) for s in sources}
    assert dropped > 0 and len(out) + dropped == len(sources)


def test_a_planted_dev_sentence_is_dropped_and_counted(cola_train):
    settings = TransferSettings(augment=1, p_mask=0.1, p_replace=0.1, p_ngram=0.25, transfer_gen=0)
    clean, _ = transfer_sentences(settings, 0, cola_train[:500], {"dev": []}, None, None, None, None)
    planted = "  " + clean[7].upper().replace(" ", "   ") + " "  # the same sentence, but for case and spaces
    out, about = transfer_sentences(settings, 0, cola_train[:500], {"dev": [planted], "ood": []}, None, None, None,
                                    None)
    assert clean[7] not in out and len(out) == len(clean) - 1
    assert about["leaked"] == {"dev": 1, "ood": 0} and about["size"] == len(out)


def test_loss_on_transfer_and_original_rows_is_the_hand_computed_one():
    g = torch.Generator().manual_seed(0)
    for n_classes in (2, 3):
        s, t = torch.randn(12, n_classes, generator=g) * 2, torch.randn(12, n_classes, generator=g) * 2
        y = torch.randint(0, n_classes, (12,), generator=g)
        y[::3] = -1  # transfer rows: no label
        for kind in ("kl", "mse"):
            for T, alpha in ((2.0, 0.5), (1.0, 0.2), (4.0, 0.9)):
                rows = []
                for i in range(12):
                    if kind == "kl":
                        soft = T * T * F.kl_div(F.log_softmax(s[i] / T, -1), F.softmax(t[i] / T, -1),
                                                reduction="sum")
                    else:
                        soft = F.mse_loss(s[i], t[i], reduction="sum")
                    hard = F.cross_entropy(s[i:i + 1], y[i:i + 1].clamp_min(0))
                    rows.append(soft if y[i] < 0 else alpha * soft + (1 - alpha) * hard)
                expected = torch.stack(rows).mean()
                assert abs(float(kd_loss(s, t, y, T, alpha, kind)) - float(expected)) <= 1e-6


def test_ece_is_scikit_learns_calibration_curve_weighted():
    import numpy as np
    from sklearn.calibration import calibration_curve
    g = torch.Generator().manual_seed(3)
    for n_classes in (2, 3):
        probs = (torch.randn(400, n_classes, generator=g) * 1.5).softmax(-1).double()
        labels = torch.randint(0, n_classes, (400,), generator=g)
        confidence, preds = probs.max(-1)
        correct = (preds == labels).numpy().astype(float)
        prob_true, prob_pred = calibration_curve(correct, confidence.numpy(), n_bins=15, strategy="uniform")
        counts = np.histogram(confidence.numpy(), bins=np.linspace(0, 1, 16))[0]
        expected = float((counts[counts > 0] / 400 * np.abs(prob_true - prob_pred)).sum())
        assert expected_calibration_error(probs, labels) == pytest.approx(expected, abs=1e-12)


@pytest.mark.parametrize("scale", [0.2, 1.0, 5.0])
def test_temperature_scaling_never_raises_the_nll_it_is_fitted_on(scale):
    g = torch.Generator().manual_seed(int(scale * 10))
    labels = torch.randint(0, 3, (300,), generator=g)
    logits = (F.one_hot(labels, 3) * 1.0 + torch.randn(300, 3, generator=g)) * scale
    T = fit_temperature(logits, labels)
    assert nll(logits, labels, T) <= nll(logits, labels)
    grid = min(nll(logits, labels, t) for t in torch.linspace(0.05, 20, 400).tolist())
    assert nll(logits, labels, T) <= grid + 1e-4


@pytest.fixture(scope="module")
def talkative_gpt2(tmp_path_factory):
    """A tiny GPT-2 whose '.' embedding is long, so that samples end sentences within a few tokens."""
    from transformers import GPT2LMHeadModel
    folder = save_tiny_gpt2(tmp_path_factory.mktemp("talkative"), initializer_range=0.02)
    model = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        model.transformer.wte.weight[13] *= 200
    model.save_pretrained(folder)
    return folder


def test_sampled_sentences_come_from_the_model_and_end_a_sentence(talkative_gpt2, tokenizer, cola_train, tmp_path):
    sample = dict(tokenizer=tokenizer, device=torch.device("cpu"), dtype=torch.float32)
    first, drawn = sample_sentences(talkative_gpt2, cola_train[:50], 6, seed=0, **sample)
    assert len(first) == 6 and drawn >= 6
    assert sample_sentences(talkative_gpt2, cola_train[:50], 6, seed=0, **sample)[0] == first
    assert sample_sentences(talkative_gpt2, cola_train[:50], 6, seed=1, **sample)[0] != first
    starts = {s.split()[0] for s in cola_train[:50]}
    assert all(s.endswith(ENDS) and s.split()[0] in starts for s in first)
    other = save_tiny_gpt2(tmp_path / "other", seed=1, initializer_range=0.02)
    assert sample_sentences(other, cola_train[:50], 2, seed=0, **sample)[0] != first[:2]


def length_recording(monkeypatch):
    """Make GPTClassifier.forward record (rows, padded length) of each call."""
    from model import GPTClassifier
    seen, forward = [], GPTClassifier.forward

    def recording(self, idx, lengths):
        seen.append((idx.size(0), idx.size(1)))
        return forward(self, idx, lengths)

    monkeypatch.setattr(GPTClassifier, "forward", recording)
    return seen


def last_record(folder):
    return json.loads((folder / "tuning" / "distil.jsonl").read_text().splitlines()[-1])


def test_transfer_set_labelled_once_through_the_cache_and_reported(adapter_dir, tmp_path, monkeypatch, capfd):
    tiny = ["--max_examples", 48, "--epochs", 1, "--rnn_hidden", 8]
    kd = ["distil", "--model_path", adapter_dir, *tiny]
    assert run_main("rnn", *tiny, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    assert run_main(*kd, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).returncode == 0
    seen = length_recording(monkeypatch)
    first = run_main(*kd, "--augment", 2, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert first.returncode == 0, first.stderr
    size = last_record(tmp_path)["transfer"]["size"]
    assert sum(rows for rows, _ in seen) == size and len(seen) < size  # once per sentence, in batches
    assert [length for _, length in seen] == sorted(length for _, length in seen)  # sorted by length
    seen.clear()
    again = run_main(*kd, "--augment", 2, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert seen == [] and last_record(tmp_path)["transfer"]["teacher_cache_hit"] is True
    report = again.stdout[again.stdout.index("Distillation report"):]
    for row in ("teacher (GPT-2 + LoRA)", "student with KD + transfer set", "student with KD  ",
                "student without KD", "majority baseline", "dev ECE", "ECE after T", f"transfer set: {size} sentences"):
        assert row in report, row
    for other in ("student with KD", "student without KD"):
        assert (f"McNemar's exact test, student with KD + transfer set vs {other} on the {COLA_DEV} dev sentences"
                in report)
    assert (tmp_path / "plots" / "calibration.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    changed = run_main(*kd, "--augment", 2, "--p_mask", 0.3, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert changed.returncode == 0 and sum(rows for rows, _ in seen) == last_record(tmp_path)["transfer"]["size"]


def test_tune_sweeps_the_transfer_flags(adapter_dir, tmp_path, monkeypatch):
    from cli import grid_sweep as tune
    monkeypatch.chdir(tmp_path)
    parser = run.build_parser()
    grid = ["augment=1,2", "transfer_gen=0,5", "p_mask=0.1,0.2", "p_ngram=0,0.25", "kd_loss=kl,mse"]
    args, rest = parser.parse_known_args(["tune", "distil", "--seeds", "1", "--grid", *grid, "--model_path",
                                          str(adapter_dir)])
    from cli.parser import config_of
    _, _, plan = tune.tune_plan(parser, config_of(args), rest)
    assert len(plan) == 32
    assert {(p["run"].transfer.augment, p["run"].distil.kd_loss, p["run"].transfer.p_ngram) for p in plan} == {
        (a, k, n) for a in (1, 2) for k in ("kl", "mse") for n in (0.0, 0.25)}
