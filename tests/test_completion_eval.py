"""Generation as evaluation: BLEU and ROUGE-L are sacrebleu's and rouge-score's own numbers (with a different number
of references per prompt), prompts batched by length decode as each alone, and `gen --adapter A --dataset D`
decodes each distinct prompt as transformers + PEFT do, with the adapter and with its base."""
import json

import pytest
from rouge_score.rouge_scorer import RougeScorer
import sacrebleu
import torch
from transformers import GPT2LMHeadModel

from config.sections import DecodeSettings
from conftest import peft_lm_adapter, run_main
from decoding.generation_eval import corpus_bleu, decode_all, group_references, length_batches, rouge_l
from decoding.sampling import Sampler
from model import EOT, GPT
from textdata.lm_examples import prompt_tokens

# Three prompts' outputs and references: two references, one, three.
OUTPUTS = ["The Eagle is a cheap coffee shop near Burger King.",
           "Blue Spice is Italian.",
           "Alimentum is a family friendly restaurant."]
REFERENCES = [["The Eagle is a low priced coffee shop near Burger King.", "Near Burger King is The Eagle, cheap."],
              ["Blue Spice is an Italian restaurant in the city centre."],
              ["Alimentum is a kid friendly place.", "A family friendly restaurant is Alimentum.",
               "Alimentum welcomes families and is a restaurant."]]


def test_bleu_is_sacrebleus_corpus_bleu_with_every_reference():
    streams = [[REFERENCES[0][0], REFERENCES[1][0], REFERENCES[2][0]],
               [REFERENCES[0][1], None, REFERENCES[2][1]],
               [None, None, REFERENCES[2][2]]]  # sacrebleu's reference streams, None where a prompt has no more
    expected = sacrebleu.corpus_bleu(OUTPUTS, streams)
    assert corpus_bleu(OUTPUTS, REFERENCES) == expected.score
    assert 0 < expected.score < 100
    # A second oracle: repeating one of a prompt's references changes no clipped count and no closest length, so
    # padding each prompt's list with copies of its first reference gives the same BLEU.
    copies = [[refs[j] if j < len(refs) else refs[0] for refs in REFERENCES] for j in range(3)]
    assert corpus_bleu(OUTPUTS, REFERENCES) == pytest.approx(sacrebleu.corpus_bleu(OUTPUTS, copies).score, abs=1e-9)
    # Empty strings as padding would be references of length 0, closer to the short second output than its own
    # reference: a different (wrong) brevity penalty.
    empty = [[r if r is not None else "" for r in stream] for stream in streams]
    assert sacrebleu.corpus_bleu(OUTPUTS, empty).score != pytest.approx(expected.score)


def test_rouge_l_is_rouge_scores_best_reference_f_measure_averaged():
    scorer = RougeScorer(["rougeL"])
    best = [max(scorer.score(ref, out)["rougeL"].fmeasure for ref in refs) for out, refs in zip(OUTPUTS, REFERENCES)]
    assert rouge_l(OUTPUTS, REFERENCES) == pytest.approx(100 * sum(best) / len(best), abs=1e-12)
    assert len(set(best)) == 3 and all(0 < b < 1 for b in best)


def test_references_are_grouped_by_prompt_in_order_of_first_appearance():
    prompts = ["b", "a", "b", "c", "a", "b"]
    completions = ["b1", "a1", "b2", "c1", "a2", "b3"]
    assert group_references(prompts, completions) == {"b": ["b1", "b2", "b3"], "a": ["a1", "a2"], "c": ["c1"]}
    assert list(group_references(prompts, completions)) == ["b", "a", "c"]


@pytest.mark.parametrize("temperature", [0.0, 1.0], ids=["greedy", "sampled"])
def test_prompts_batched_by_length_decode_as_each_alone(tiny_gpt_dir, tokenizer, temperature):
    model = GPT.from_pretrained(tiny_gpt_dir).eval()
    texts = ["name[Alimentum]", "name[Aromi]", "name[Bibimbap]", "eatType[pub]", "near[Cafe Rouge]", "food[Thai]"]
    ids = [prompt_tokens(tokenizer, t) for t in texts]
    batches = length_batches(ids)
    assert any(len(b) > 1 for b in batches) and len(batches) > 1  # some prompts share a batch, some do not
    assert sorted(i for b in batches for i in b) == list(range(len(ids)))
    settings = DecodeSettings(max_new_tokens=12, temperature=temperature, top_k=50)
    alone = []
    for i, prompt in enumerate(ids):
        sampler = Sampler(temperature, 50, seed=3 + i)
        tokens = []
        for t in model.generate(prompt, 12, sampler, eos_id=EOT):
            if t == EOT:
                break
            tokens.append(t)
        alone.append(tokens)
    assert decode_all(model, ids, settings, "decoding", seed=3) == alone
    assert len({tuple(a) for a in alone}) > 1


def hf_decode(model, prompt_ids, **kwargs):
    """transformers' generate of one prompt, the output up to <|endoftext|>."""
    out = model.generate(input_ids=torch.tensor([prompt_ids]), max_new_tokens=8, pad_token_id=EOT, eos_token_id=EOT,
                         **kwargs)[0, len(prompt_ids):].tolist()
    return out[:out.index(EOT)] if EOT in out else out


@pytest.fixture(scope="module")
def pairs_folder(tmp_path_factory):
    """A tiny E2E-like dataset: the first validation prompt has two references, the other one."""
    folder = tmp_path_factory.mktemp("data") / "e2e-tiny"
    folder.mkdir()
    (folder / "train.csv").write_text('mr,ref\n"name[Aromi], food[Thai]",Aromi serves Thai food.\n')
    (folder / "validation.csv").write_text('mr,ref\n"name[Blue Spice], area[city]",Blue Spice is in the city.\n'
                                           'eatType[pub],It is a pub.\n'
                                           '"name[Blue Spice], area[city]",In the city is Blue Spice.\n')
    return folder


@pytest.mark.parametrize("decoding", [("--greedy",), ("--num_beams", "2", "--no_repeat_ngram_size", "2",
                                                     "--length_penalty", "0.8")], ids=["greedy", "beams"])
def test_gen_dataset_decodes_each_prompt_with_the_adapter_and_its_base(tiny_gpt_dir, pairs_folder, tokenizer,
                                                                       tmp_path, monkeypatch, capfd, decoding):
    adapter = tmp_path / "adapter"
    theirs = peft_lm_adapter(tiny_gpt_dir, adapter, r=4, lora_alpha=8, target_modules=["c_attn", "c_fc"])
    result = run_main("gen", "--adapter", adapter, "--dataset", pairs_folder, "--prompt_column", "mr",
                      "--completion_column", "ref", "--max_new_tokens", 8, "--dtype", "float32", *decoding,
                      cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert result.returncode == 0, result.stderr
    lines = [json.loads(line) for line in (tmp_path / "tuning" / "gen-e2e-tiny.jsonl").read_text().splitlines()]
    assert [line["prompt"] for line in lines] == ["name[Blue Spice], area[city]", "eatType[pub]"]
    assert lines[0]["references"] == ["Blue Spice is in the city.", "In the city is Blue Spice."]
    assert lines[1]["references"] == ["It is a pub."]
    beams = {} if decoding[0] == "--greedy" else dict(num_beams=2, no_repeat_ngram_size=2, length_penalty=0.8)
    base = GPT2LMHeadModel.from_pretrained(tiny_gpt_dir).eval()
    for line in lines:
        ids = prompt_tokens(tokenizer, line["prompt"])
        assert line["output"] == tokenizer.decode(hf_decode(theirs, ids, do_sample=False, **beams))
        assert line["base_output"] == tokenizer.decode(hf_decode(base, ids, do_sample=False, **beams))
    assert any(line["output"] != line["base_output"] for line in lines)  # the adapter changes the text
    outputs = {key: [line[key] for line in lines] for key in ("output", "base_output")}
    refs = [line["references"] for line in lines]
    record = json.loads((tmp_path / "tuning" / "gen-e2e-tiny.json").read_text())
    assert (record["prompts"], record["references"]) == (2, 3)
    assert record["bleu"] == corpus_bleu(outputs["output"], refs)
    assert record["base_rougeL"] == rouge_l(outputs["base_output"], refs)
    table = result.stdout.splitlines()
    assert table[0].split() == ["model", "BLEU", "ROUGE-L"]
    assert table[2].split() == ["adapter", str(adapter), f"{record['bleu']:.2f}", f"{record['rougeL']:.2f}"]
    assert table[3].split() == ["base", tiny_gpt_dir, f"{record['base_bleu']:.2f}", f"{record['base_rougeL']:.2f}"]
    assert "2 prompts" in table[4] and "3 references" in table[4]
