"""Language-model adapters in PEFT's CAUSAL_LM format: loaded here with PEFT's logits, decoded by `gen --adapter`
token for token as transformers + PEFT decode, exported as a plain GPT2LMHeadModel, refused where a classifier
is meant (and the other way round)."""
import copy

import pytest
import torch
from transformers import GPT2LMHeadModel

from conftest import PAD_BATCH, padded, peft_lm_adapter, run_main, save_tiny_adapter
from training import checkpoints

PROMPT = "The quick brown fox"


@pytest.fixture(scope="module")
def lm_adapter(tiny_gpt_dir, tmp_path_factory):
    folder = tmp_path_factory.mktemp("lm") / "adapter"
    return folder, peft_lm_adapter(tiny_gpt_dir, folder, r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"])


@pytest.mark.parametrize("lora", [dict(r=4, lora_alpha=8, target_modules=["c_attn", "c_proj", "c_fc"]),
                                  dict(r=2, lora_alpha=3, target_modules=["mlp.c_proj"], modules_to_save=["ln_f"])])
def test_peft_causal_lm_adapter_gives_peft_logits_here(tiny_gpt_dir, tmp_path, lora):
    theirs = peft_lm_adapter(tiny_gpt_dir, tmp_path / "peft", **lora)
    ours = checkpoints.load_lora_lm(tmp_path / "peft")
    ids, _ = padded(PAD_BATCH)
    with torch.no_grad():
        assert (ours(ids) - theirs(input_ids=ids).logits).abs().max() <= 1e-5


def test_gen_with_the_adapter_is_peft_greedy_token_for_token(lm_adapter, tokenizer, tmp_path, monkeypatch, capfd):
    folder, theirs = lm_adapter
    prompt_ids = tokenizer.encode(PROMPT)
    theirs.generation_config.eos_token_id = None
    expected = theirs.generate(input_ids=torch.tensor([prompt_ids]), do_sample=False, max_new_tokens=20,
                               pad_token_id=50256)[0, len(prompt_ids):].tolist()
    args = ("gen", "--prompt", PROMPT, "--greedy", "--ignore_eos", "--max_new_tokens", 20, "--dtype", "float32",
            "--no_stream")
    with_adapter = run_main(*args, "--adapter", folder, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert with_adapter.returncode == 0, with_adapter.stderr
    assert with_adapter.stdout == PROMPT + tokenizer.decode(expected) + "\n"
    base = checkpoints.read_adapter_config(folder)["base_model"]
    without = run_main(*args, "--gpt_variant", base, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert without.returncode == 0 and without.stdout != with_adapter.stdout  # the adapter changes the text


def test_export_of_an_lm_adapter_is_peft_merged_with_the_head_tied(lm_adapter, tmp_path, monkeypatch, capfd):
    folder, theirs = lm_adapter
    result = run_main("export", "--model_path", folder, "--out", tmp_path / "merged", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0 and "GPT2LMHeadModel.from_pretrained" in result.stdout, result.stderr
    plain = GPT2LMHeadModel.from_pretrained(tmp_path / "merged").eval()
    assert plain.lm_head.weight.data_ptr() == plain.transformer.wte.weight.data_ptr()
    ids, _ = padded(PAD_BATCH)
    with torch.no_grad():
        merged = copy.deepcopy(theirs).merge_and_unload()  # PEFT's own merge: a plain GPT2LMHeadModel
        assert (plain(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max() <= 1e-5


def test_adapters_of_the_other_task_are_refused_in_one_line(lm_adapter, tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    folder, _ = lm_adapter
    classifier = save_tiny_adapter(tmp_path / "classifier", tiny_gpt_dir)
    gen = run_main("gen", "--adapter", classifier, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert gen.returncode == 2 and gen.stderr.count("\n") == 1
    assert gen.stderr.startswith(f"error: --adapter {classifier}: a classification adapter; gen decodes with a "
                                 "language-model (CAUSAL_LM) adapter")
    predict = run_main("predict", "--model_path", folder, "--sentence", "Hi.", cwd=tmp_path, monkeypatch=monkeypatch,
                       capfd=capfd)
    assert predict.returncode == 2 and predict.stderr.count("\n") == 1
    assert predict.stderr.startswith(f"error: --model_path {folder}: a language-model (CAUSAL_LM) adapter; predict "
                                     "classifies")
