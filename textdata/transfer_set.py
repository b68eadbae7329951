"""The transfer set of distillation: sentences beyond the training set, which the teacher alone labels. Made by
Tang et al.'s rules (augment.py, --augment) and by sampling from the teacher's GPT-2 base (--transfer_gen), then
cleaned: no duplicates, no training sentence, and no sentence of dev, the second evaluation or the held-out
calibration sentences (normalised case and spaces; those dropped are counted and reported)."""
import random

from tqdm import tqdm

from decoding.packed_weights import prepare_for_generation
from decoding.sampling import Sampler
from model import EOT, GPT
from textdata.augmentation import augment, normalised
from training.checkpoints import gpt_weights

SAMPLES_PER_PROMPT = 8  # the samples one prompt decodes in one batch (gen's --num_samples machinery)
SENTENCE_TOKENS = 48  # a sample with no sentence end within this many new tokens is dropped
ENDS = (".", "!", "?")


def sentence_end_ids(tokenizer):
    """The tokens whose text ends a sentence (ends in . ! ?, possibly followed by closing quotes)."""
    ends = set()
    for i in range(tokenizer.n_vocab):
        try:
            text = tokenizer.decode_single_token_bytes(i).decode("utf-8")
        except (KeyError, UnicodeDecodeError):
            continue
        if text.rstrip("\"')”’").endswith(ENDS):
            ends.add(i)
    return ends


class UntilSentenceEnd:
    """A sampler that ends its sample (draws <|endoftext|>) once the sample has ended a sentence or a line."""

    def __init__(self, sampler, prompt_length, ends, newlines):
        self.sampler, self.prompt_length, self.ends, self.newlines = sampler, prompt_length, ends, newlines

    def __call__(self, logits, context):
        if len(context) > self.prompt_length and (context[-1] in self.ends or context[-1] in self.newlines):
            return EOT
        return self.sampler(logits, context)


def prompt_words(sentences, rng):
    """The first one to three words (never all of them, when it has more than one) of a random sentence."""
    words = rng.choice(sentences).split()
    return " ".join(words[:rng.randint(1, max(1, min(3, len(words) - 1)))])


def sample_sentences(variant, sentences, n, *, seed, tokenizer, device, dtype):
    """Up to `n` distinct sentences sampled from the GPT-2 `variant` (temperature 1, top-k 50), each continuing the
    first words of a training sentence and cut where it first ends a sentence, drawn from `seed`. Samples that end
    no sentence within SENTENCE_TOKENS new tokens, repeat one drawn before or equal a training sentence are
    dropped; after 4 n samples the list stays shorter than `n`. Returns (sentences, samples drawn)."""
    rng = random.Random(seed)
    model = prepare_for_generation(gpt_weights(GPT, variant, False), device, dtype, rows=SAMPLES_PER_PROMPT)
    ends = sentence_end_ids(tokenizer)
    newlines = {i for i in range(tokenizer.n_vocab) if i not in ends and "\n" in tokenizer.decode([i])}
    seen, out, drawn = {normalised(s) for s in sentences}, [], 0
    bar = tqdm(total=n, desc="sampling the transfer set", leave=False, disable=None)
    while len(out) < n and drawn < 4 * n:
        prompt = tokenizer.encode_ordinary(prompt_words(sentences, rng))
        samplers = [UntilSentenceEnd(Sampler(1.0, 50, None, 1.0, seed=rng.getrandbits(32)), len(prompt), ends,
                                     newlines) for _ in range(SAMPLES_PER_PROMPT)]
        rows = [list(prompt) for _ in samplers]
        for step in model.generate_batch(prompt, SENTENCE_TOKENS, samplers, eos_id=EOT):
            for row, token in zip(rows, step):
                if token is not None and token != EOT:
                    row.append(token)
        drawn += len(rows)
        for row in rows:
            text = tokenizer.decode(row).strip()
            if row[-1] in ends and len(row) > len(prompt) and normalised(text) not in seen and len(out) < n:
                seen.add(normalised(text))
                out.append(text)
                bar.update()
    bar.close()
    return out, drawn


def transfer_sentences(settings, seed, train, heldout, variant, tokenizer, device, dtype):
    """The transfer set's sentences as `settings` (config.sections.TransferSettings) ask, drawn from `seed`, and
    what it is: its source, and how many drawn sentences were dropped as duplicates and as equal to a sentence of
    each of `heldout` ({name: sentences}: dev, ood, heldout)."""
    s, out, sources, dropped = settings, [], [], 0
    if s.augment:
        made, dropped = augment(train, s.augment, p_mask=s.p_mask, p_replace=s.p_replace, p_ngram=s.p_ngram,
                                seed=seed)
        out += made
        sources.append(f"{s.augment} per training sentence by Tang et al.'s rules (p_mask {s.p_mask}, "
                       f"p_replace {s.p_replace} from the unigram distribution, p_ngram {s.p_ngram})")
    if s.transfer_gen:
        made, drawn = sample_sentences(variant, train, s.transfer_gen, seed=seed, tokenizer=tokenizer,
                                       device=device, dtype=dtype)
        dropped += drawn - len(made)
        known = {normalised(s) for s in out}
        out += [s for s in made if normalised(s) not in known]
        dropped += len(made) - (len(out) - len(known))
        sources.append(f"{len(made)} of {drawn} samples of {variant} prompted with 1-3 first words of training "
                       "sentences")
    keys = {name: {normalised(s) for s in sentences} for name, sentences in heldout.items()}
    leaked = {name: sum(normalised(s) in k for s in out) for name, k in keys.items()}
    out = [s for s in out if not any(normalised(s) in k for k in keys.values())]
    return out, {"size": len(out), "source": "; ".join(sources), "dropped": dropped, "leaked": leaked}
