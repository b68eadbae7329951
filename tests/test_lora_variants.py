"""rsLoRA and DoRA with PEFT as the oracle: logits, one step's gradients, adapters saved here loading in PEFT and
PEFT's loading here; for the classifier and the language model."""
import json

import pytest
import torch

from conftest import PAD_BATCH, padded, run_main
from model import GPT, GPTClassifier, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora, unmerge_lora
from textdata.readers import get_tokenizer
from training import checkpoints

TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
VARIANTS = [dict(use_rslora=True), dict(use_dora=True), dict(use_rslora=True, use_dora=True)]
NO_DROPOUT = dict(attn_pdrop=0.0, resid_pdrop=0.0, embd_pdrop=0.0, summary_first_dropout=0.0)
TASKS = {"SEQ_CLS": GPTClassifier, "CAUSAL_LM": GPT}


def peft_model(gpt_dir, task, variant, dropout=0.0, seed=0):
    """PEFT's rank-4 (alpha 8) adapter on all four layers of the tiny GPT-2, with random (as if trained) weights."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    cls = GPT2ForSequenceClassification if task == "SEQ_CLS" else GPT2LMHeadModel
    torch.manual_seed(seed)
    base = cls.from_pretrained(gpt_dir, **NO_DROPOUT)
    model = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, lora_dropout=dropout, fan_in_fan_out=True,
                                            target_modules=["c_attn", "c_proj", "c_fc"], task_type=task, **variant))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * (0.05 if "magnitude" in name else 0.3))
    return model


def our_name(peft_name):
    """Our parameter's name for a PEFT one (base_model.model.X.lora_A.default.weight -> X.lora_A.weight)."""
    name = peft_name.removeprefix("base_model.model.").replace(".modules_to_save.default", "")
    return name.replace(".lora_magnitude_vector.default.weight", ".lora_magnitude_vector").replace(".default", "")


def our_twin(gpt_dir, theirs, task, variant, dropout=0.0):
    """Our model with PEFT's model's weights, every trainable tensor copied over."""
    model = TASKS[task].from_pretrained(gpt_dir)
    inject_lora(model, 4, 8, dropout, TARGETS, rslora=variant.get("use_rslora", False),
                dora=variant.get("use_dora", False))
    mark_only_lora_as_trainable(model)
    ours = dict(model.named_parameters())
    with torch.no_grad():
        for name, p in theirs.named_parameters():
            if p.requires_grad:
                ours[our_name(name)].copy_(p)
    return model


def logits(model, task, ids, lengths):
    if isinstance(model, GPT):
        return model(ids, lengths) if task == "SEQ_CLS" else model(ids)
    return model(input_ids=ids).logits


def loss(out, task, ids):
    if task == "SEQ_CLS":
        return torch.nn.functional.cross_entropy(out, torch.tensor([1, 0, 1]))
    return torch.nn.functional.cross_entropy(out[:, :-1].flatten(0, 1), ids[:, 1:].flatten())


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v))
def test_forward_and_gradients_equal_peft(tiny_gpt_dir, task, variant):
    theirs = peft_model(tiny_gpt_dir, task, variant)
    ours = our_twin(tiny_gpt_dir, theirs, task, variant)
    ids, lengths = padded(PAD_BATCH)
    theirs.eval(), ours.eval()
    with torch.no_grad():
        assert (logits(ours, task, ids, lengths) - logits(theirs, task, ids, lengths)).abs().max() <= 1e-5
    loss(logits(ours, task, ids, lengths), task, ids).backward()
    loss(logits(theirs, task, ids, lengths), task, ids).backward()
    grads = dict(ours.named_parameters())
    compared = 0
    for name, p in theirs.named_parameters():
        if ".lora_" in name:
            assert (grads[our_name(name)].grad - p.grad).abs().max() <= 1e-5, name
            compared += 1
    assert compared == 2 * 4 * (3 if variant.get("use_dora") else 2)  # A, B (and m) of 4 layers in 2 blocks


def test_dora_with_dropout_trains_as_peft_does(tiny_gpt_dir):
    """With dropout, DoRA's base term reads the dropped-out input (PEFT's form): same masks, same gradients."""
    theirs = peft_model(tiny_gpt_dir, "CAUSAL_LM", dict(use_dora=True), dropout=0.3)
    ours = our_twin(tiny_gpt_dir, theirs, "CAUSAL_LM", dict(use_dora=True), dropout=0.3)
    ids, lengths = padded(PAD_BATCH)
    theirs.train(), ours.train()
    for model in (ours, theirs):
        torch.manual_seed(1)
        loss(logits(model, "CAUSAL_LM", ids, lengths), "CAUSAL_LM", ids).backward()
    grads = dict(ours.named_parameters())
    for name, p in theirs.named_parameters():
        if ".lora_" in name:
            assert (grads[our_name(name)].grad - p.grad).abs().max() <= 1e-5, name


def test_an_untrained_dora_layer_computes_the_base_layer(tiny_gpt_dir):
    base = GPTClassifier.from_pretrained(tiny_gpt_dir).eval()
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        before = base(ids, lengths)
        after = inject_lora(base, 4, 8, dora=True)(ids, lengths)
    assert (before - after).abs().max() <= 1e-5


@pytest.mark.parametrize("variant", VARIANTS, ids=lambda v: "+".join(v))
def test_merge_folds_the_variant_exactly_and_unmerge_undoes_it(tiny_gpt_dir, variant):
    theirs = peft_model(tiny_gpt_dir, "SEQ_CLS", variant)
    ours = our_twin(tiny_gpt_dir, theirs, "SEQ_CLS", variant).eval()
    weights = [layer.base.weight.clone() for layer in lora_layers(ours)]
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        unmerged = ours(ids, lengths)
        merge_lora(ours)
        assert (ours(ids, lengths) - unmerged).abs().max() <= 1e-5
        unmerge_lora(ours)
    assert all((layer.base.weight - w).abs().max() <= 1e-5 for layer, w in zip(lora_layers(ours), weights))


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS[:2], ids=lambda v: "+".join(v))
def test_our_saved_adapter_loads_in_peft_and_predicts_the_same(tiny_gpt_dir, tmp_path, task, variant):
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification, GPT2LMHeadModel
    ours = our_twin(tiny_gpt_dir, peft_model(tiny_gpt_dir, task, variant), task, variant).eval()
    checkpoints.save_trained(ours, tmp_path / "a", {"gpt_variant": tiny_gpt_dir})
    cls = GPT2ForSequenceClassification if task == "SEQ_CLS" else GPT2LMHeadModel
    theirs = PeftModel.from_pretrained(cls.from_pretrained(tiny_gpt_dir), tmp_path / "a").eval()
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        assert (logits(ours, task, ids, lengths) - logits(theirs, task, ids, lengths)).abs().max() <= 1e-5


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("variant", VARIANTS[:2], ids=lambda v: "+".join(v))
def test_a_peft_made_adapter_loads_here_folded_with_peft_logits(tiny_gpt_dir, tmp_path, task, variant):
    theirs = peft_model(tiny_gpt_dir, task, variant).eval()
    theirs.save_pretrained(tmp_path / "peft")
    load = checkpoints.load_lora_classifier if task == "SEQ_CLS" else checkpoints.load_lora_lm
    ours = load(tmp_path / "peft", tiny_gpt_dir)
    assert not lora_layers(ours)  # folded: plain linear layers
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():  # folded weights round unlike PEFT's unmerged sum (3e-5 on the LM)
        assert (logits(ours, task, ids, lengths) - logits(theirs, task, ids, lengths)).abs().max() <= 1e-4


def test_predict_with_a_peft_dora_adapter_prints_peft_probabilities(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    theirs = peft_model(tiny_gpt_dir, "SEQ_CLS", dict(use_dora=True, use_rslora=True)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    result = run_main("predict", "--model_path", tmp_path / "peft", "--gpt_variant", tiny_gpt_dir, "--format",
                      "jsonl", "--dtype", "float32", "--sentence", "The cat sat.", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    p = json.loads(result.stdout.splitlines()[0])["p_acceptable"]
    ids = torch.tensor([get_tokenizer().encode_ordinary("The cat sat.")])
    with torch.no_grad():
        expected = torch.softmax(theirs(input_ids=ids).logits, -1)[0, 1].item()
    assert p == pytest.approx(expected, abs=1e-5)


def test_export_folds_dora_into_a_plain_transformers_checkpoint(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    from transformers import GPT2ForSequenceClassification
    theirs = peft_model(tiny_gpt_dir, "SEQ_CLS", dict(use_dora=True)).eval()
    theirs.save_pretrained(tmp_path / "peft")
    result = run_main("export", "--model_path", tmp_path / "peft", "--gpt_variant", tiny_gpt_dir, "--out",
                      tmp_path / "merged", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    plain = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids, _ = padded(PAD_BATCH)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-5
