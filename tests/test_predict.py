"""Using what was trained: `predict`, adapters from and to PEFT, and the merged Hugging Face export."""
import json

import pytest
import torch

from conftest import COLA_DEV, PAD_BATCH, padded, run_cli, run_main
import run
from training import checkpoints
from utils import UserError


def peft_adapter(tiny_gpt_dir, folder, seed=0, **lora):
    """An adapter saved by PEFT itself, with random (as if trained) weights; returns PEFT's model too."""
    from peft import LoraConfig, get_peft_model
    from transformers import GPT2ForSequenceClassification
    torch.manual_seed(seed)
    base = GPT2ForSequenceClassification.from_pretrained(tiny_gpt_dir, num_labels=2)
    model = get_peft_model(base, LoraConfig(fan_in_fan_out=True, task_type="SEQ_CLS", **lora))
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.add_(torch.randn_like(p) * 0.3)
    model.save_pretrained(folder)
    return model.eval()


@pytest.mark.parametrize("lora", [
    dict(r=8, lora_alpha=16, target_modules=["c_attn"]),
    dict(r=2, lora_alpha=7, target_modules=["c_attn", "c_proj", "c_fc"], modules_to_save=["ln_1", "ln_2", "ln_f"]),
    dict(r=4, lora_alpha=4, target_modules=["mlp.c_proj", "attn.c_proj"]),
])
def test_peft_adapter_into_ours(tiny_gpt_dir, tmp_path, lora):
    theirs = peft_adapter(tiny_gpt_dir, tmp_path / "peft", **lora)
    ours = checkpoints.load_lora_classifier(tmp_path / "peft")
    ids, lengths = padded(PAD_BATCH)
    with torch.no_grad():
        assert (ours(ids, lengths) - theirs(input_ids=ids).logits).abs().max() <= 1e-4


@pytest.mark.parametrize("lora, setting", [
    (dict(r=4, target_modules=["c_attn"], bias="all"), "bias"),
])
def test_what_we_cannot_represent_is_refused_by_name(tiny_gpt_dir, tmp_path, lora, setting):
    peft_adapter(tiny_gpt_dir, tmp_path / "peft", **lora)
    with pytest.raises(UserError, match=setting):
        checkpoints.load_lora_classifier(tmp_path / "peft")


def test_other_target_modules_are_refused(tmp_path):
    (tmp_path / "a").mkdir()
    (tmp_path / "a" / "adapter_config.json").write_text(json.dumps(
        {"peft_type": "LORA", "r": 4, "lora_alpha": 4, "target_modules": ["q_proj", "c_attn"]}))
    with pytest.raises(UserError, match="q_proj"):
        checkpoints.load_lora_classifier(tmp_path / "a", "gpt2")


def test_merged_export_loads_in_transformers(tiny_gpt_dir, tmp_path):
    from transformers import GPT2ForSequenceClassification
    theirs = peft_adapter(tiny_gpt_dir, tmp_path / "peft", r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    assert run.main(["export", "--model_path", str(tmp_path / "peft"), "--out", str(tmp_path / "merged")]) == 0
    plain = GPT2ForSequenceClassification.from_pretrained(tmp_path / "merged").eval()
    ids, _ = padded(PAD_BATCH)
    with torch.no_grad():
        assert (plain(input_ids=ids).logits - theirs(input_ids=ids).logits).abs().max() <= 1e-4


def test_predict_on_cola_tsv_reproduces_the_training_evaluation(tiny_gpt_dir, tmp_path, cola_dir, monkeypatch,
                                                                capfd):
    trained = run_cli("LoRA", "--gpt_variant", tiny_gpt_dir, "--max_examples", 128, "--epochs", 1,
                      "--dtype", "float32", "--model_path", "adapter", cwd=tmp_path)
    assert trained.returncode == 0, trained.stderr
    record = json.loads((tmp_path / "tuning" / "LoRA.jsonl").read_text().splitlines()[-1])
    dev = f"{cola_dir}/in_domain_dev.tsv"
    table = run_main("predict", "--model_path", "adapter", "--input", dev, "--dtype", "float32", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert table.returncode == 0, table.stderr
    expected = f"accuracy {record['dev_acc']:.2%}  MCC {record['dev_mcc']:+.3f}  on {COLA_DEV} labelled sentences"
    assert expected in table.stdout
    assert "majority class scores 69.26% (MCC 0)" in table.stdout
    rows = run_main("predict", "--model_path", "adapter", "--input", dev, "--dtype", "float32", "--format", "jsonl",
                    cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    preds = [int(json.loads(line)["label"] == "acceptable") for line in rows.stdout.splitlines()]
    assert preds == record["dev_preds"]


@pytest.fixture(scope="module")
def student_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("student")
    result = run_cli("rnn", "--max_examples", 64, "--epochs", 1, "--rnn_hidden", 16, "--model_path", "s", cwd=folder)
    assert result.returncode == 0, result.stderr
    return folder / "s"


@pytest.mark.parametrize("kind", ["adapter", "student"])
def test_predict_from_stdin_survives_awkward_lines(kind, tiny_gpt_dir, tmp_path, student_dir):
    if kind == "adapter":
        peft_adapter(tiny_gpt_dir, tmp_path / "m", r=4, target_modules=["c_attn"])
    folder = tmp_path / "m" if kind == "adapter" else student_dir
    lines = ["", " ".join(["word"] * 2000), "Ça va très bien, naïve café — 日本語."]
    result = run_cli("predict", "--model_path", folder, "--format", "jsonl", cwd=tmp_path,
                     input="\n".join(lines) + "\n")
    assert result.returncode == 0, result.stderr
    rows = [json.loads(line) for line in result.stdout.splitlines()]
    assert [r["sentence"] for r in rows] == lines
    assert all(r["label"] in ("acceptable", "unacceptable") and 0 <= r["p_acceptable"] <= 1 for r in rows)


def test_predict_sentences_keep_their_order(student_dir, tmp_path, monkeypatch, capfd):
    sentences = ["A much longer sentence than the other ones here.", "Short.", "Medium length one."]
    args = [a for s in sentences for a in ("--sentence", s)]
    result = run_main("predict", "--model_path", student_dir, "--format", "tsv", *args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert [line.split("\t")[2] for line in result.stdout.splitlines()] == sentences


def test_predict_on_a_folder_that_is_neither(tmp_path, monkeypatch, capfd):
    result = run_main("predict", "--model_path", tmp_path, "--sentence", "x", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 1 and result.stderr.count("\n") == 1 and "neither" in result.stderr


def test_weights_outside_the_declared_targets_are_refused_naming_both(tiny_gpt_dir, tmp_path):
    peft_adapter(tiny_gpt_dir, tmp_path / "peft", r=4, target_modules=["c_attn", "c_fc"])
    config = json.loads((tmp_path / "peft" / "adapter_config.json").read_text())
    (tmp_path / "peft" / "adapter_config.json").write_text(json.dumps(config | {"target_modules": ["c_attn"]}))
    with pytest.raises(UserError, match=r"holds transformer\.h\.0\.mlp\.c_fc\.lora_A\.weight, outside the target "
                                        r"set \['attn\.c_attn'\]"):
        checkpoints.load_lora_classifier(tmp_path / "peft")


def test_predict_on_a_file_whose_label_column_is_empty_scores_nothing(student_dir, tmp_path, monkeypatch, capfd):
    (tmp_path / "nolab.csv").write_text("sentence,label\nGood.,\nBad.,\n")
    result = run_main("predict", "--model_path", student_dir, "--input", "nolab.csv", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert "no row has a label: nothing scored (2 unlabelled rows)" in result.stdout
