"""Beam search = transformers' GPT2LMHeadModel.generate(num_beams=K, do_sample=False) token for token, on one KV
cache whose rows follow the beams; the n-gram ban = transformers' NoRepeatNGramLogitsProcessor."""
import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from conftest import run_main, save_tiny_gpt2
from decoding.beam_search import BeamSettings, beam_search
from decoding.sampling import Sampler, ban_repeated_ngrams
from model import GPT

EOS = 50256
PROMPTS = ([464, 2068, 7586, 21831], [40, 716, 257])


def eos_prone_gpt2(folder, strength):
    """A tiny GPT-2 whose <|endoftext|> logit is raised by `strength` along a direction every final hidden state
    shares (ln_f's bias), so hypotheses end inside a short window and some beams end before others."""
    save_tiny_gpt2(folder, initializer_range=0.05)
    hf = GPT2LMHeadModel.from_pretrained(folder)
    with torch.no_grad():
        v = torch.randn(hf.config.n_embd, generator=torch.Generator().manual_seed(0))
        hf.transformer.ln_f.bias.copy_(v * 0.5)
        hf.transformer.wte.weight[EOS] = v * strength
    hf.save_pretrained(folder)
    return GPT.from_pretrained(folder).eval(), GPT2LMHeadModel.from_pretrained(folder).eval()


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """{'rare': EOS never inside the window, 'ending': EOS ends hypotheses inside it}: (ours, transformers')."""
    return {name: eos_prone_gpt2(tmp_path_factory.mktemp(name), strength)
            for name, strength in (("rare", 0.02), ("ending", 0.048))}


def hf_beams(hf, prompt, max_new_tokens, s, eos_id):
    hf.generation_config.eos_token_id = eos_id
    out = hf.generate(torch.tensor([prompt]), num_beams=s.num_beams, do_sample=False, max_new_tokens=max_new_tokens,
                      length_penalty=s.length_penalty, no_repeat_ngram_size=s.no_repeat_ngram_size,
                      repetition_penalty=s.repetition_penalty,
                      early_stopping=s.early_stopping, pad_token_id=EOS, eos_token_id=eos_id)[0, len(prompt):]
    out = out.tolist()
    return out[:out.index(EOS) + 1] if eos_id is not None and EOS in out else out  # the rest is padding


# length penalties below 1, where hypotheses that end early can win (above 1 they lose to long ones: see the cache test)
SETTINGS = [BeamSettings(2, 0.8, 3), BeamSettings(2, -1.0, 0, True, 1.3), BeamSettings(4, 0.8, 3),
            BeamSettings(4, 0.5, 2, "never")]


@pytest.mark.parametrize("settings", SETTINGS, ids=repr)
def test_beam_search_equals_transformers_with_and_without_eos_in_the_window(models, settings):
    ended = 0
    for name, eos_id in (("rare", None), ("ending", EOS)):
        ours, hf = models[name]
        for prompt in PROMPTS:
            expected = hf_beams(hf, prompt, 16, settings, eos_id)
            assert beam_search(ours, prompt, 16, settings, eos_id=eos_id) == expected, (name, prompt)
            ended += expected[-1:] == [EOS] and len(expected) < 16
    assert ended  # the window did hold an end of text: that path was compared too


def test_beams_share_one_cache_that_reads_the_prompt_once(models, monkeypatch):
    ours, hf = models["rare"]
    seen, hidden = [], GPT.hidden

    def recording(self, idx, cache=None):
        seen.append(tuple(idx.shape))
        return hidden(self, idx, cache)

    monkeypatch.setattr(GPT, "hidden", recording)
    settings = BeamSettings(4, 2.0, 2)
    tokens = beam_search(ours, PROMPTS[0], 12, settings, eos_id=None)
    assert seen == [(1, 4)] + [(4, 1)] * 11  # the prompt once, then one new token per beam per step
    assert tokens == hf_beams(hf, PROMPTS[0], 12, settings, None)


def test_ngram_ban_equals_transformers_processor():
    g = torch.Generator().manual_seed(0)
    for n in (1, 2, 3, 4):
        context = torch.randint(0, 5, (12,), generator=g).tolist()
        logits = torch.randn(50, generator=g)
        expected = NoRepeatNGramLogitsProcessor(n)(torch.tensor([context]), logits[None].clone())[0]
        assert torch.equal(ban_repeated_ngrams(logits, context, n), expected)
    assert torch.equal(ban_repeated_ngrams(logits, context, 0), logits)


def test_greedy_with_ngram_ban_equals_transformers(models):
    ours, hf = models["rare"]
    hf.generation_config.eos_token_id = None
    expected = hf.generate(torch.tensor([PROMPTS[0]]), do_sample=False, max_new_tokens=30, no_repeat_ngram_size=2,
                           pad_token_id=EOS)[0, 4:].tolist()
    assert list(ours.generate(PROMPTS[0], 30, Sampler(0, no_repeat_ngram_size=2))) == expected
    assert list(ours.generate(PROMPTS[0], 30, Sampler(0))) != expected  # the ban changed something


def test_cli_gen_beams_print_transformers_text(models, tokenizer, tmp_path, monkeypatch, capfd):
    ours, hf = models["ending"]
    folder = hf.name_or_path
    prompt = "The quick brown"
    expected = hf_beams(hf, tokenizer.encode(prompt), 12, BeamSettings(4, 0.8, 3), EOS)
    result = run_main("gen", "--gpt_variant", folder, "--prompt", prompt, "--max_new_tokens", 12, "--num_beams", 4,
                      "--length_penalty", 0.8, "--no_repeat_ngram_size", 3, "--dtype", "float32", cwd=tmp_path,
                      monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout == prompt + tokenizer.decode([t for t in expected if t != EOS]) + "\n"
