"""Distillation: the KD loss against torch's kl_div, the student's padding invariance and size, the teacher run
exactly once (and never with its cache), and the rnn / distil commands end to end."""
import json
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from conftest import (COLA_DEV, COLA_HELDOUT, COLA_OOD, count_classifier_rows, run_cli, run_main, save_tiny_adapter,
                      save_tiny_gpt2)
from model import EOT, DistilRNN, GPTClassifier, RNNConfig, count_parameters
import run
from textdata.batches import Split
from train_utils import predict_logits, train_epoch
from training.kd_loss import KDLoss, kd_loss


@pytest.mark.parametrize("n_classes", [2, 3])
@pytest.mark.parametrize("T, alpha", [(1.0, 1.0), (2.0, 0.5), (4.0, 0.1), (0.5, 0.9)])
def test_kd_loss_is_hintons_formula(T, alpha, n_classes):
    g = torch.Generator().manual_seed(0)
    s, t = torch.randn(16, n_classes, generator=g) * 3, torch.randn(16, n_classes, generator=g) * 3
    y = torch.randint(0, n_classes, (16,), generator=g)
    expected = (alpha * T * T * F.kl_div(F.log_softmax(s / T, -1), F.softmax(t / T, -1), reduction="batchmean")
                + (1 - alpha) * F.cross_entropy(s, y))
    assert kd_loss(s, t, y, T, alpha) == pytest.approx(float(expected), abs=1e-6)


def test_soft_part_is_zero_when_student_equals_teacher():
    s = torch.randn(8, 2)
    assert float(kd_loss(s, s.clone(), torch.zeros(8, dtype=torch.long), 2.0, 1.0)) == pytest.approx(0.0, abs=1e-6)


def test_gradient_at_alpha_1_T_1_is_softmax_difference():
    g = torch.Generator().manual_seed(1)
    s = (torch.randn(10, 2, generator=g) * 2).requires_grad_()
    t = torch.randn(10, 2, generator=g) * 2
    kd_loss(s, t, torch.zeros(10, dtype=torch.long), 1.0, 1.0).backward()
    assert torch.isfinite(s.grad).all()
    assert torch.allclose(s.grad, (F.softmax(s, -1) - F.softmax(t, -1)).detach() / 10, atol=1e-6)


def test_default_student_size():
    assert count_parameters(DistilRNN(RNNConfig()))[0] == 40_961_282


@pytest.mark.parametrize("cell", ["rnn", "gru", "lstm"])
def test_padding_has_no_effect_on_the_student(cell):
    torch.manual_seed(0)
    model = DistilRNN(RNNConfig(hidden=16, cell=cell)).eval()
    seqs = [[5, 6, 7], [1, 2, 3, 4, 5, 6, 7, 8], [9]]
    ids = torch.full((3, 8), EOT)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    together = model(ids, torch.tensor([3, 8, 1]))
    for row, s in enumerate(seqs):
        assert torch.allclose(together[row], model(torch.tensor([s]), torch.tensor([len(s)]))[0], atol=1e-6)


def test_tiny_student_matches_a_tiny_teacher(tiny_gpt_dir, tokenizer, cola_dir):
    from textdata.readers import load_cola
    sentences, labels = load_cola(cola_dir)["train"]
    tokens = [tokenizer.encode_ordinary(s) for s in sentences[:32]]
    torch.manual_seed(0)
    teacher = GPTClassifier.from_pretrained(tiny_gpt_dir).eval()
    cpu = torch.device("cpu")
    t_logits = predict_logits(teacher, tokens, batch_size=32, device=cpu, dtype=torch.float32)
    split = Split(tokens, torch.tensor(labels[:32]), t_logits)
    student = DistilRNN(RNNConfig(hidden=64, cell="gru"))
    opt = torch.optim.Adam(student.parameters(), lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(40):
        train_epoch(student, split, KDLoss(temperature=1.0, alpha=1.0), opt, batch_size=8, generator=g,
                    device=cpu, dtype=torch.float32, clip=1.0)
    s_logits = predict_logits(student, tokens, batch_size=32, device=cpu, dtype=torch.float32)
    assert torch.equal(s_logits.argmax(-1), t_logits.argmax(-1))


def test_teacher_runs_once_per_example_and_never_with_its_cache(adapter_dir, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    seen = count_classifier_rows(monkeypatch.setattr)
    args = ["distil", "--model_path", str(adapter_dir), "--max_examples", "64", "--epochs", "2", "--rnn_hidden", "32"]
    assert run.main(args) == 0
    # each training example once, and the held-out, dev and out-of-domain dev sentences once
    assert sum(seen) == 64 + COLA_HELDOUT + COLA_DEV + COLA_OOD
    seen.clear()
    assert run.main(args) == 0
    assert sum(seen) == 0


def test_teacher_logits_are_cached_again_when_a_local_base_changes(tmp_path, monkeypatch):
    base = save_tiny_gpt2(tmp_path / "base")
    adapter = save_tiny_adapter(tmp_path / "adapter", base)
    monkeypatch.chdir(tmp_path)
    seen = count_classifier_rows(monkeypatch.setattr)
    args = ["distil", "--model_path", str(adapter), "--max_examples", "16", "--epochs", "1", "--rnn_hidden", "8"]
    assert run.main(args) == 0 and sum(seen) > 0
    seen.clear()
    save_tiny_gpt2(base, seed=1)  # the same folder, other weights
    assert run.main(args) == 0 and sum(seen) > 0


def test_cli_rnn_then_distil_end_to_end(adapter_dir, tmp_path, monkeypatch, capfd):
    common = ["--max_examples", 256, "--epochs", 2, "--rnn_hidden", 32]
    rnn = run_main("rnn", *common, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert rnn.returncode == 0, rnn.stderr
    distil = run_cli("distil", "--model_path", adapter_dir, *common, cwd=tmp_path)
    assert distil.returncode == 0, distil.stderr
    for name in ("rnn_loss", "rnn_acc", "distil_loss", "distil_acc"):
        assert (tmp_path / "plots" / f"{name}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    report = distil.stdout[distil.stdout.index("Distillation report"):]
    for row in ("teacher (GPT-2 + LoRA)", "student with KD", "student without KD", "majority baseline"):
        assert row in report
    assert f"McNemar's exact test, student with KD vs student without KD on the {COLA_DEV} dev sentences" in report
    assert (tmp_path / "plots" / "summary.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    kd = json.loads((tmp_path / "tuning" / "distil.jsonl").read_text().splitlines()[-1])
    assert len(kd["dev_preds"]) == COLA_DEV and kd["config"]["distil"]["temperature"] == 2.0
    assert (tmp_path / "models" / "distil-rnn" / "model.safetensors").exists()
    assert (tmp_path / "models" / "rnn" / "config.json").exists()


def test_the_student_without_kd_is_an_rnn_run_that_differs_by_kd_alone(tmp_path, monkeypatch):
    from cli.parser import config_of
    from config.records import config_fields, read_record
    from training.distil_report import latest_matching_rnn_run, rnn_log
    monkeypatch.chdir(tmp_path)
    parser = run.build_parser()
    kd = read_record(config_fields(config_of(parser.parse_args(["distil"]))) | {"data": "d"})
    rnn_runs = [config_fields(config_of(parser.parse_args(["rnn", *extra]))) | {"data": "d", "id": i}
                for i, extra in enumerate([[], ["--lr", "0.01"], ["--epochs", "1"], ["--rnn_hidden", "8"]])]
    (tmp_path / "tuning").mkdir()
    Path(rnn_log(kd)).write_text("".join(json.dumps(r, default=str) + "\n" for r in rnn_runs))
    assert latest_matching_rnn_run(kd)["id"] == 0


def test_cli_distil_without_adapter_says_how_to_make_one(tmp_path, monkeypatch, capfd):
    result = run_main("distil", "--model_path", "missing/adapter", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 1
    assert result.stderr.count("\n") == 1 and "python run.py LoRA" in result.stderr
