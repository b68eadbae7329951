"""LoRA: the invariants of the wrapper, PEFT as the oracle for logits and the saved format, the CLI run."""
import copy
import json

import pytest
import torch

from conftest import PAD_BATCH, padded, randomize_adapter, run_cli, run_main
from model import GPTClassifier, inject_lora, lora_layers, mark_only_lora_as_trainable, merge_lora, unmerge_lora
from textdata.batches import Split
from train_utils import cross_entropy, train_epoch
from training.checkpoints import load_adapter_weights, read_adapter_config, save_adapter


@pytest.fixture
def classifier(tiny_gpt_dir):
    torch.manual_seed(0)
    return GPTClassifier.from_pretrained(tiny_gpt_dir).eval()


def test_untrained_adapter_leaves_the_model_unchanged_bit_for_bit(classifier):
    ids, lengths = padded(PAD_BATCH)
    before = classifier(ids, lengths)
    after = inject_lora(copy.deepcopy(classifier), rank=4, alpha=8)(ids, lengths)
    assert torch.equal(before, after)


def test_padding_does_not_change_a_sentence_logits(classifier):
    ids, lengths = padded(PAD_BATCH)
    together = classifier(ids, lengths)
    for row, s in enumerate(PAD_BATCH):
        alone = classifier(torch.tensor([s]), torch.tensor([len(s)]))
        assert (together[row] - alone[0]).abs().max() <= 1e-5


def test_merge_and_unmerge(classifier):
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=4, alpha=8))
    randomize_adapter(model)
    ids, lengths = padded(PAD_BATCH)
    weights = [layer.base.weight.clone() for layer in lora_layers(model)]
    unmerged = model(ids, lengths)
    merge_lora(model)
    assert (model(ids, lengths) - unmerged).abs().max() <= 1e-5
    unmerge_lora(model)
    for layer, w in zip(lora_layers(model), weights):
        assert (layer.base.weight - w).abs().max() <= 1e-6
    assert torch.allclose(model(ids, lengths), unmerged, atol=1e-6)


def test_merge_refuses_nan(classifier):
    model = inject_lora(classifier, rank=2, alpha=2)
    layer = lora_layers(model)[0]
    with torch.no_grad():
        layer.lora_B.weight.fill_(float("nan"))
    with pytest.raises(Exception, match="NaN"):
        layer.merge()


def test_only_lora_layernorm_and_head_train(classifier):
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=4, alpha=4))
    frozen = {k: v.clone() for k, v in model.named_parameters() if not v.requires_grad}
    trainable = {k for k, v in model.named_parameters() if v.requires_grad}
    assert trainable and all(".lora_" in k or ".ln_" in k or k.startswith("score.") for k in trainable)
    assert sum(".ln_" in k for k in trainable) == 2 * (2 * 2 + 1)  # weight and bias of ln_1, ln_2 per block, ln_f
    ids, lengths = padded(PAD_BATCH)
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    model.train()
    cross_entropy(model(ids, lengths), torch.tensor([1, 0, 1])).backward()
    grads = {k for k, v in model.named_parameters() if v.grad is not None}
    assert grads == trainable
    opt.step()
    assert all(torch.equal(v, frozen[k]) for k, v in model.named_parameters() if k in frozen)


@pytest.mark.parametrize("variant, lines", [
    ("gpt2", ["Number of parameters: 125.03M", "Number of trainable parameters: 0.63M", "Reduction: 99.50%",
              "Trained: ln_1, ln_2, ln_f, lora_A, lora_B, score"]),
    ("gpt2-medium", ["Number of parameters: 356.40M", "Number of trainable parameters: 1.68M", "Reduction: 99.53%",
                     "Trained: ln_1, ln_2, ln_f, lora_A, lora_B, score"]),
])
def test_parameter_table_matches_the_seed_without_a_download(variant, lines, tmp_path, monkeypatch, capfd):
    result = run_main("LoRA", "--gpt_variant", variant, "--epochs", "0", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == lines
    assert not any(tmp_path.iterdir())  # nothing evaluated, nothing written


def hf_peft_classifier(tiny_gpt_dir, adapter_dir):
    from peft import PeftModel
    from transformers import GPT2ForSequenceClassification
    base = GPT2ForSequenceClassification.from_pretrained(tiny_gpt_dir, num_labels=2)
    return PeftModel.from_pretrained(base, adapter_dir).eval()


def test_saved_adapter_loads_into_peft_with_our_logits(classifier, tiny_gpt_dir, tmp_path):
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=4, alpha=8, targets=("attn.c_attn", "mlp.c_fc")))
    randomize_adapter(model)
    save_adapter(model, tmp_path / "adapter", rank=4, alpha=8, dropout=0.0, targets=("attn.c_attn", "mlp.c_fc"),
                 base_model=tiny_gpt_dir, run_info={})
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        ours = model(ids, lengths)
        theirs = hf_peft_classifier(tiny_gpt_dir, tmp_path / "adapter")(input_ids=ids).logits
    assert (ours - theirs).abs().max() <= 1e-4


def test_our_keys_are_peft_keys(classifier, tiny_gpt_dir, tmp_path):
    from peft import LoraConfig, get_peft_model
    from safetensors.torch import load_file
    from transformers import GPT2ForSequenceClassification
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=4, alpha=4))
    save_adapter(model, tmp_path / "ours", rank=4, alpha=4, dropout=0.0,
                 targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), base_model="x", run_info={})
    peft_model = get_peft_model(GPT2ForSequenceClassification.from_pretrained(tiny_gpt_dir), LoraConfig(
        r=4, lora_alpha=4, target_modules=["c_attn", "c_proj", "c_fc"], fan_in_fan_out=True, task_type="SEQ_CLS",
        modules_to_save=["ln_1", "ln_2", "ln_f", "score"]))
    peft_model.save_pretrained(tmp_path / "peft")
    ours = load_file(tmp_path / "ours" / "adapter_model.safetensors")
    theirs = load_file(tmp_path / "peft" / "adapter_model.safetensors")
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_adapter_round_trip_into_our_model(classifier, tiny_gpt_dir, tmp_path):
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=3, alpha=6))
    randomize_adapter(model, seed=5)
    save_adapter(model, tmp_path / "a", rank=3, alpha=6, dropout=0.0,
                 targets=("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj"), base_model=tiny_gpt_dir,
                 run_info={})
    cfg = read_adapter_config(tmp_path / "a")
    fresh = inject_lora(GPTClassifier.from_pretrained(tiny_gpt_dir), cfg["r"], cfg["alpha"], 0.0, cfg["targets"])
    load_adapter_weights(fresh, tmp_path / "a")
    ids, lengths = padded(PAD_BATCH)
    assert torch.allclose(fresh.eval()(ids, lengths), model(ids, lengths), atol=1e-6)


def test_a_tiny_model_overfits_32_sentences(classifier, tokenizer, cola_dir):
    from textdata.readers import load_cola
    sentences, labels = load_cola(cola_dir)["train"]
    split = Split([tokenizer.encode_ordinary(s) for s in sentences[:32]], torch.tensor(labels[:32]))
    model = mark_only_lora_as_trainable(inject_lora(classifier, rank=8, alpha=16))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=3e-3)
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        train_epoch(model, split, cross_entropy, opt, batch_size=8, generator=g, device=torch.device("cpu"),
                    dtype=torch.float32)
    result = cross_entropy.evaluate(model, split, batch_size=32, device=torch.device("cpu"), dtype=torch.float32)
    assert result["acc"] == 1.0


def is_png(path):
    from PIL import Image
    with Image.open(path) as im:
        im.verify()
        return im.format == "PNG"


def test_cli_lora_end_to_end(tiny_gpt_dir, tmp_path):
    (tmp_path / "tuning").mkdir()
    (tmp_path / "tuning" / "LoRA.jsonl").write_text('{"earlier": "run"}\n')
    result = run_cli("LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", 256, "--epochs", 2,
                     "--model_path", "out/adapter", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert is_png(tmp_path / "plots" / "LoRA_loss.png") and is_png(tmp_path / "plots" / "LoRA_acc.png")
    assert {p.name for p in (tmp_path / "out" / "adapter").iterdir()} == {
        "README.md", "adapter_config.json", "adapter_model.safetensors", "run_info.json"}
    lines = (tmp_path / "tuning" / "LoRA.jsonl").read_text().splitlines()
    assert len(lines) == 2
    record = json.loads(lines[1])
    assert len(record["history"]) == 2 and 1 <= record["best_epoch"] <= 2
    assert record["config"]["lora"]["LoRA_rank"] == 4 and record["dtype"] in ("float32", "bfloat16")
    assert "majority baseline" in result.stdout and "MCC" in result.stdout
    assert not [p for p in tmp_path.rglob("*") if p.name.endswith(".tmp")]


def test_micro_batches_give_the_same_step_as_the_whole_batch(classifier, tokenizer, cola_dir):
    from textdata.readers import load_cola
    sentences, labels = load_cola(cola_dir)["train"]
    split = Split([tokenizer.encode_ordinary(s) for s in sentences[:48]], torch.tensor(labels[:48]))
    model = mark_only_lora_as_trainable(inject_lora(classifier, 4, 4))
    randomize_adapter(model)
    models = [model, copy.deepcopy(model)]
    for model, budget in zip(models, (None, 64)):
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        train_epoch(model, split, cross_entropy, opt, batch_size=48, generator=torch.Generator().manual_seed(0),
                    device=torch.device("cpu"), dtype=torch.float32, micro_batch_tokens=budget)
    for (name, a), b in zip(models[0].named_parameters(), models[1].parameters()):
        assert (a - b).abs().max() <= 1e-6, name
