"""What LoRA is compared with: --method full against transformers trained the same way, --method head training
the head and the LayerNorms alone (and its folder loading where an adapter does), and --grad_checkpoint giving the
gradients of the plain backward pass."""
import copy
import json

from huggingface_hub import ModelCard
import pytest
import torch

from conftest import PAD_BATCH, padded, run_main
import model as model_module
from model import GPT, METHODS, GPTClassifier, inject_lora
from train_utils import cross_entropy
from training import checkpoints

LABELS = torch.tensor([1, 0, 1])
NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0)


def hf_twin(gpt_dir, ours):
    """transformers' model of our model's kind with our weights (the classifier's score head included)."""
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    if isinstance(ours, GPTClassifier):
        hf = GPT2ForSequenceClassification.from_pretrained(gpt_dir, **NO_DROPOUT)
        with torch.no_grad():
            hf.score.weight.copy_(ours.score.weight)
        return hf
    return GPT2LMHeadModel.from_pretrained(gpt_dir, **NO_DROPOUT)


def loss_of(model, ids, lengths):
    if isinstance(model, GPTClassifier):
        return cross_entropy(model(ids, lengths), LABELS)
    if isinstance(model, GPT):
        logits = model(ids)
    else:
        logits = model(input_ids=ids).logits
        if logits.dim() == 2:  # transformers' classifier
            return cross_entropy(logits, LABELS)
    return torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("cls", [GPTClassifier, GPT])
def test_full_fine_tuning_steps_as_transformers_does(tiny_gpt_dir, cls):
    torch.manual_seed(0)
    ours = METHODS["full"](cls.from_pretrained(tiny_gpt_dir))
    theirs = hf_twin(tiny_gpt_dir, ours)
    ids, lengths = padded(PAD_BATCH)
    losses = []
    for model in (ours, theirs):
        model.train()
        optimizer = torch.optim.SGD(model.parameters(), lr=0.5)
        loss = loss_of(model, ids, lengths)
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], abs=1e-5)
    trained = theirs.state_dict()
    for key, value in ours.hf_state_dict().items():  # the tied embedding once, as wte
        expected = trained[key] if key in trained else trained[f"transformer.{key}"]
        assert (value - expected).abs().max() <= 1e-5, key
    assert sum(p.numel() for p in ours.parameters() if p.requires_grad) == sum(p.numel() for p in theirs.parameters())


def test_head_trains_the_score_head_and_the_layernorms_alone(tiny_gpt_dir):
    model = METHODS["head"](GPTClassifier.from_pretrained(tiny_gpt_dir))
    before = {k: v.clone() for k, v in model.named_parameters()}
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    ids, lengths = padded(PAD_BATCH)
    loss_of(model, ids, lengths).backward()
    optimizer.step()
    changed = {k for k, v in model.named_parameters() if not torch.equal(v, before[k])}
    named = {k for k in before if k == "score.weight" or ".ln_" in k}
    assert changed == named and len(named) == 1 + 2 * (2 * 2 + 1)  # ln_1, ln_2 per block, ln_f: weight and bias


@pytest.mark.parametrize("method, dora", [("lora", False), ("lora", True), ("full", False)])
@pytest.mark.parametrize("cls", [GPTClassifier, GPT])
def test_grad_checkpoint_gives_the_same_loss_and_gradients(tiny_gpt_dir, cls, method, dora):
    torch.manual_seed(0)
    plain = cls.from_pretrained(tiny_gpt_dir)
    if method == "lora":
        inject_lora(plain, 4, 8, dropout=0.2, dora=dora)  # dropout: the recomputation draws the same masks
    METHODS[method](plain)
    with torch.no_grad():
        for p in plain.parameters():
            p.add_(torch.randn_like(p) * 0.05)  # B no longer zero
    recomputed = copy.deepcopy(plain)
    recomputed.grad_checkpoint = True
    ids, lengths = padded(PAD_BATCH)
    losses = []
    for model in (plain, recomputed):
        model.train()
        torch.manual_seed(1)
        losses.append(loss_of(model, ids, lengths))
        losses[-1].backward()
    assert (losses[0] - losses[1]).abs() <= 1e-6
    grads = [(name, p.grad) for name, p in recomputed.named_parameters() if p.requires_grad]
    assert grads and all(g is not None for _, g in grads)
    for (name, g), p in zip(grads, (p for p in plain.parameters() if p.requires_grad)):
        assert (g - p.grad).abs().max() <= 1e-6, name


def test_one_sweep_compares_the_three_methods_and_each_saves_what_loads(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    """A sweep over --method (with --grad_checkpoint): each run's record holds its method, the full run's folder
    loads in transformers and predict, the head run's in predict, distil and export."""
    calls = []
    real = model_module.checkpoint
    monkeypatch.setattr(model_module, "checkpoint", lambda *a, **k: calls.append(1) or real(*a, **k))
    result = run_main("tune", "LoRA", "--seeds", 0, "--grid", "method=lora,head,full", "--epochs", 1, "--name", "m",
                      "--max_examples", 32, "--dtype", "float32", "--grad_checkpoint", "--gpt_variant", tiny_gpt_dir,
                      cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert calls and "Trained: every weight" in result.stdout and "Trained: ln_1, ln_2, ln_f, score" in result.stdout
    records = [json.loads(line) for line in (tmp_path / "tuning" / "LoRA.jsonl").read_text().splitlines()]
    assert sorted(r["config"]["lora"]["method"] for r in records) == ["full", "head", "lora"]
    assert all(r["config"]["train"]["grad_checkpoint"] for r in records)
    assert all(f"method={m}" in (tmp_path / "tuning" / "m.md").read_text() for m in ("lora", "head", "full"))
    assert (tmp_path / "plots" / "LoRA-full_acc.png").is_file() and (tmp_path / "plots" / "LoRA-head_acc.png").is_file()
    runs = tmp_path / "models" / "tune" / "m"
    for r in records:
        method = r["config"]["lora"]["method"]
        card = ModelCard.load(runs / f"method_{method}_seed0" / "README.md").data
        assert card.library_name == {"lora": "peft", "full": "transformers", "head": None}[method]
        assert [e.metric_value for e in card.eval_results] == [r["dev_acc"], r["dev_mcc"]]
    check_full_folder(runs / "method_full_seed0", tmp_path, monkeypatch, capfd)
    check_head_folder(runs / "method_head_seed0", tiny_gpt_dir, tmp_path, monkeypatch, capfd)


def check_full_folder(folder, tmp_path, monkeypatch, capfd):
    from transformers import GPT2ForSequenceClassification
    hf = GPT2ForSequenceClassification.from_pretrained(folder).eval()
    ours = checkpoints.load_predictor(folder, None)
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        assert (ours(ids, lengths) - hf(input_ids=ids).logits).abs().max() <= 1e-5
    predicted = run_main("predict", "--model_path", folder, "--sentence", "The cat sat.", "--dtype", "float32",
                         cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert predicted.returncode == 0, predicted.stderr


def check_head_folder(folder, gpt_dir, tmp_path, monkeypatch, capfd):
    from safetensors.torch import load_file
    from transformers import GPT2ForSequenceClassification
    saved = load_file(folder / "head_model.safetensors")
    assert "score.weight" in saved and all(k == "score.weight" or ".ln_" in k for k in saved)
    assert json.loads((folder / "head_config.json").read_text())["base_model_name_or_path"] == gpt_dir
    ours = checkpoints.load_predictor(folder, None)
    base = GPTClassifier.from_pretrained(gpt_dir).state_dict()
    trained = ours.state_dict()
    assert {k for k in base if torch.equal(base[k], trained[k])} == set(base) - set(saved)
    exported = run_main("export", "--model_path", folder, "--out", tmp_path / "merged", cwd=tmp_path,
                        monkeypatch=monkeypatch, capfd=capfd)
    assert exported.returncode == 0, exported.stderr
    hf = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        assert (ours(ids, lengths) - hf(input_ids=ids).logits).abs().max() <= 1e-5
    for command in (["predict", "--model_path", folder, "--sentence", "The cat sat."],
                    ["distil", "--model_path", folder, "--max_examples", 16, "--epochs", 1, "--rnn_hidden", 8]):
        result = run_main(*command, "--dtype", "float32", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
        assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("argv, message", [
    (["--method", "full", "--use_dora"], "--use_dora is a variant of LoRA"),
    (["--method", "head", "--use_rslora"], "--use_rslora is a variant of LoRA"),
    (["--method", "head", "--task", "lm", "--dataset", "notes.txt"], "--method head trains a classifier"),
])
def test_what_does_not_go_with_a_method_is_a_usage_error(argv, message, tmp_path, monkeypatch, capfd):
    result = run_main("LoRA", *argv, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 2 and message in result.stderr and result.stderr.count("\n") == 1
