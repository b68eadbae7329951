"""Generation as evaluation: decode every prompt of a prompt -> completion split with the model and with its base,
and score the outputs against each prompt's references with sacrebleu's corpus BLEU and rouge-score's ROUGE-L.

A prompt's references are all the completions the split pairs it with (E2E has several per meaning
representation), in the order they first appear. Each distinct prompt is decoded once, from the very tokens a
completion follows in training (lm_data.prompt_tokens: the prompt, then the separator, tokenized apart).
"""
from dataclasses import asdict
import json
from pathlib import Path
from statistics import mean

from tqdm import tqdm

from decoding.beam_search import beam_search, beam_settings
from decoding.packed_weights import prepare_for_generation
from decoding.sampling import sampler_for
from model import EOT, GPT
from textdata.lm_examples import prompt_tokens, read_lm_data
from textdata.readers import get_tokenizer, run_stem
from training.checkpoints import adapter_base, build_lm, gpt_weights, load_lora_lm
from training.tables import format_table
from utils import TUNING_DIR, UserError, atomic_files, seed_everything

# The most prompts of one token length decoded in one batch. A step reads every weight once whatever the rows, so
# rows share that cost; the KV cache grows with them (gpt2-medium, 32 rows of 160 positions: about 1 GB in fp32).
BATCH_ROWS = 32


def group_references(prompts, completions):
    """{prompt: [its completions]}, prompts and each one's completions in the order they first appear."""
    references = {}
    for prompt, completion in zip(prompts, completions):
        references.setdefault(prompt, []).append(completion)
    return references


def corpus_bleu(outputs, references):
    """sacrebleu's corpus BLEU (its defaults: 13a tokenization, case-sensitive, exponential smoothing) of `outputs`
    against `references` (a list per output, of any length), 0-100.

    sacrebleu reads reference streams, stream j holding every output's j-th reference; an output with fewer
    references has None in the streams past its last. sacrebleu drops a None, while an empty string would stay a
    reference of length 0, one the brevity penalty could pick as the closest length."""
    import sacrebleu
    depth = max(len(refs) for refs in references)
    streams = [[refs[j] if j < len(refs) else None for refs in references] for j in range(depth)]
    return sacrebleu.corpus_bleu(list(outputs), streams).score


def rouge_l(outputs, references):
    """rouge-score's ROUGE-L F-measure (LCS over its default tokens: lowercased, alphanumeric, no stemming), each
    output against the reference it scores best with (score_multi), averaged over outputs, 0-100."""
    from rouge_score.rouge_scorer import RougeScorer
    scorer = RougeScorer(["rougeL"])
    return 100 * mean(scorer.score_multi(refs, out)["rougeL"].fmeasure for out, refs in zip(outputs, references))


def length_batches(prompt_ids, rows=BATCH_ROWS):
    """Lists of at most `rows` prompt indices whose prompts have one token length, shortest prompts first."""
    by_length = {}
    for i, ids in enumerate(prompt_ids):
        by_length.setdefault(len(ids), []).append(i)
    return [same[k:k + rows] for n in sorted(by_length) for same in [by_length[n]] for k in range(0, len(same), rows)]


def decode_all(model, prompt_ids, settings, desc, seed=0):
    """Each prompt's output token ids (up to, not including, <|endoftext|>), decoded as `settings`
    (config.sections.DecodeSettings) say: beam search one prompt at a time (its beams are the batch), or sampling
    with the prompts of one length in one batch, prompt i's sampler seeded with seed + i, so that a prompt's output
    does not depend on the prompts batched with it."""
    eos = EOT if settings.stop_at_eos else None
    beams = beam_settings(settings)
    outputs = [None] * len(prompt_ids)
    batches = [[i] for i in range(len(prompt_ids))] if beams else length_batches(prompt_ids)
    with tqdm(total=len(prompt_ids), desc=desc, leave=False, disable=None) as bar:
        for batch in batches:
            if beams:
                found = [beam_search(model, prompt_ids[batch[0]], settings.max_new_tokens, beams, eos)]
            else:
                found = decode_batch(model, [prompt_ids[i] for i in batch],
                                     [sampler_for(settings, seed + i) for i in batch], settings.max_new_tokens, eos)
            for i, ids in zip(batch, found):
                outputs[i] = [t for t in ids if t != eos]
            bar.update(len(batch))
    return outputs


def decode_batch(model, prompts, samplers, max_new_tokens, eos):
    """The token ids each sampler draws continuing its prompt (all of one length), decoded together."""
    rows = [[] for _ in prompts]
    for step in model.generate_batch(prompts, max_new_tokens, samplers, eos_id=eos):
        for row, token in zip(rows, step):
            if token is not None:
                row.append(token)
    return rows


def evaluate_generation(model, base_model, pairs, settings, tokenizer, out_path, about=None, seed=0):
    """Decode every distinct prompt of `pairs` (prompts, completions) with `model` and, unless it is None,
    `base_model` (both ready to decode: eval mode, on their device), score both, write one JSON line per prompt to
    `out_path` (prompt, output[, base_output], references) and the scores, settings and `about` beside it (.json).
    Returns the scores: {prompts, references, bleu, rougeL[, base_bleu, base_rougeL]}."""
    references = group_references(*pairs)
    prompts, refs = list(references), list(references.values())
    if not prompts:
        raise UserError("the evaluation split holds no prompt -> completion pairs to decode")
    ids = [prompt_tokens(tokenizer, p) for p in prompts]
    check_context(model, ids, settings)
    texts = {"output": decode_texts(model, ids, settings, tokenizer, "decoding", seed)}
    if base_model is not None:
        texts["base_output"] = decode_texts(base_model, ids, settings, tokenizer, "decoding with the base model", seed)
    scores = {"prompts": len(prompts), "references": sum(len(r) for r in refs)}
    for key, outputs in texts.items():
        prefix = "base_" if key == "base_output" else ""
        scores |= {prefix + "bleu": corpus_bleu(outputs, refs), prefix + "rougeL": rouge_l(outputs, refs)}
    lines = [{"prompt": p, **{key: outputs[i] for key, outputs in texts.items()}, "references": refs[i]}
             for i, p in enumerate(prompts)]
    record = {**(about or {}), "settings": asdict(settings) | {"seed": seed}, **scores}
    out_path = Path(out_path)
    with atomic_files(out_path.parent, [out_path.name, out_path.with_suffix(".json").name]) as tmp:
        Path(tmp[out_path.name]).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
        Path(tmp[out_path.with_suffix(".json").name]).write_text(json.dumps(record, indent=2) + "\n",
                                                                 encoding="utf-8")
    return scores


def decode_texts(model, prompt_ids, settings, tokenizer, desc, seed):
    return [tokenizer.decode(ids) for ids in decode_all(model, prompt_ids, settings, desc, seed)]


def check_context(model, prompt_ids, settings):
    """Beam search keeps prompt and output in the context (sampling slides its window past it)."""
    longest = max(len(ids) for ids in prompt_ids)
    if settings.num_beams > 1 and longest + settings.max_new_tokens > model.config.block_size:
        raise UserError(f"beam search keeps the prompt and --max_new_tokens {settings.max_new_tokens} in the "
                        f"{model.config.block_size}-token context, and the longest prompt (with the separator) has "
                        f"{longest} tokens; ask for fewer")


def evaluate_split(spec, pairs, source, adapter, settings, seed, device, dtype):
    """`gen --dataset`: the evaluation split of `spec` (its `pairs` columns: config.sections.PairColumns) decoded as
    `settings` say, with the model gen would decode with (the `adapter` merged into its base, else the `source`
    model: config.sections.ModelSource) and, with an adapter, its base as the baseline, built as load_lora_model
    builds it; the scores printed, the outputs written to tuning/gen-<dataset>.jsonl."""
    prompts = read_lm_data(spec, pairs.prompt_column, pairs.completion_column)["dev"]
    names = {"output": f"adapter {adapter}" if adapter else source.gpt_variant}
    if adapter:
        model = load_lora_lm(adapter, source.gpt_variant)
        _, info, variant = adapter_base(adapter, source.gpt_variant)
        base = build_lm(variant, info.get("random_init", False), info.get("seed", 0))  # as load_lora_model builds it
        names["base_output"] = f"base {variant}"
    else:
        seed_everything(seed)  # --random_init draws its weights from the seed
        model, base = gpt_weights(GPT, source.gpt_variant, source.random_init), None
    model, base = [None if m is None else prepare_for_generation(m, device, dtype, rows=settings.num_beams,
                                                                 quantize=source.quantize) for m in (model, base)]
    out_path = Path(TUNING_DIR) / f"{run_stem('gen', spec)}.jsonl"
    about = {"dataset": spec.name, "eval_split": spec.eval_split, "prompt_column": pairs.prompt_column,
             "completion_column": pairs.completion_column, "adapter": adapter, "models": names}
    scores = evaluate_generation(model, base, prompts, settings, get_tokenizer(), out_path, about, seed)
    print_scores(scores, names, spec, out_path)
    return scores


def print_scores(scores, names, spec, out_path):
    rows = [[names[key], f"{scores[prefix + 'bleu']:.2f}", f"{scores[prefix + 'rougeL']:.2f}"]
            for key, prefix in (("output", ""), ("base_output", "base_")) if key in names]
    print(format_table(["model", "BLEU", "ROUGE-L"], rows))
    print(f"{scores['prompts']} prompts of {spec.name}'s evaluation split, {scores['references']} references; "
          f"outputs in {out_path}")
