"""Picking the next token from logits (repetition penalty, n-gram ban, temperature, top-k, top-p) and printing
samples as they decode."""
import codecs

import torch
import torch.nn.functional as F


class Sampler:
    """Picks the next token from logits: repetition penalty, n-gram ban, then temperature, top-k, top-p
    (transformers' order).

    temperature 0 means greedy (argmax after the repetition penalty). The logits may be in the model's dtype: what
    needs fp32 arithmetic (the penalty, the temperature and what follows) casts what it reads, so the top-k cut
    reads a bf16 row as it is, with the order it has in fp32 (the conversion is exact).
    """

    def __init__(self, temperature=1.0, top_k=None, top_p=None, repetition_penalty=1.0, seed=None,
                 no_repeat_ngram_size=0):
        self.temperature, self.top_k, self.top_p = temperature, top_k, top_p
        self.repetition_penalty, self.no_repeat_ngram_size = repetition_penalty, no_repeat_ngram_size
        self.generator = torch.Generator()
        if seed is not None:
            self.generator.manual_seed(seed)

    def __call__(self, logits, context):
        logits = apply_repetition_penalty(logits, context, self.repetition_penalty)
        logits = ban_repeated_ngrams(logits, context, self.no_repeat_ngram_size)
        if self.temperature == 0:
            return int(logits.argmax())
        u = torch.rand((), generator=self.generator)
        return int(draw(logits, u.to(logits.device), self.temperature, self.top_k, self.top_p))


def sampler_for(decode, seed):
    """The Sampler of gen's decoding flags (config.sections.DecodeSettings), drawing from `seed`."""
    return Sampler(decode.sampling_temperature, decode.sampling_top_k, decode.top_p, decode.repetition_penalty,
                   seed=seed, no_repeat_ngram_size=decode.no_repeat_ngram_size)


def draw(logits, u, temperature, top_k=None, top_p=None):
    """The token that the uniform `u` in [0, 1) picks from softmax(logits / temperature) cut to the top-k, then the
    top-p nucleus: the first token whose cumulative probability passes u. `logits` (..., vocab), `u` one per row
    (...). One uniform per draw, no generator inside: the same function of the logits for one sample on the host
    and for a batch inside a compiled step (static_decoding.py), so both draw the same tokens from the same seeds."""
    candidates = None
    if top_k is not None:  # sample among the k best only: the same distribution, far less work
        logits, candidates = top_k_candidates(logits, top_k)  # a positive temperature keeps the order
    logits = logits.float() / temperature  # fp32 from here, whatever the model's dtype
    if top_p is not None:
        logits = top_p_filter(logits, top_p)
    cdf = F.softmax(logits, dim=-1).cumsum(-1)
    # Tokens whose cumulative probability is at most u * total come before the pick (a zero-probability token
    # never is the pick); u < 1 keeps it in range, the clamp guards the last bit of rounding.
    choice = (cdf <= u.unsqueeze(-1) * cdf[..., -1:]).sum(-1, keepdim=True).clamp_max(cdf.size(-1) - 1)
    return (choice if candidates is None else candidates.gather(-1, choice)).squeeze(-1)


def apply_repetition_penalty(logits, context, penalty):
    """CTRL's rule: each token already in the context has its logit divided by `penalty` if positive, else
    multiplied by it."""
    if penalty == 1.0 or not context:
        return logits
    seen = torch.tensor(sorted(set(context)), device=logits.device)
    logits = logits.to(torch.float32, copy=True)  # the division and product in fp32, as the model's dtype may not be
    scores = logits[seen]
    logits[seen] = torch.where(scores > 0, scores / penalty, scores * penalty)
    return logits


def banned_tokens(context, n):
    """The tokens that would make an n-gram of `context` occur twice (transformers' NoRepeatNGramLogitsProcessor):
    those that followed an earlier occurrence of the context's last n - 1 tokens."""
    if n <= 0 or len(context) + 1 < n:
        return []
    tail = tuple(context[len(context) + 1 - n:])
    return [gram[-1] for gram in zip(*[context[i:] for i in range(n)]) if gram[:-1] == tail]


def ban_repeated_ngrams(logits, context, n):
    """`logits` with the tokens that would repeat an n-gram of `context` at -inf (n = 0: unchanged)."""
    banned = banned_tokens(context, n)
    if not banned:
        return logits
    logits = logits.clone()
    logits[banned] = float("-inf")
    return logits


def penalize_seen(logits, seen, penalty):
    """apply_repetition_penalty for rows of logits (B, vocab) whose seen tokens `seen` (B, vocab) marks: the same
    arithmetic, with no shape that depends on the context."""
    return torch.where(seen, torch.where(logits > 0, logits / penalty, logits * penalty), logits)


def top_k_candidates(logits, k):
    """The k largest logits of each row, in descending order, and their token ids."""
    return torch.topk(logits, min(k, logits.size(-1)))


def top_p_filter(logits, p):
    """Keep, in each row, the smallest set of most likely tokens whose probability adds up to at least p (nucleus
    sampling)."""
    sorted_logits, order = torch.sort(logits, dim=-1, descending=True)
    probs = F.softmax(sorted_logits, dim=-1)
    mass_before = probs.cumsum(-1) - probs  # probability of the tokens ranked above each one
    drop_sorted = mass_before >= p
    drop_sorted[..., 0] = False  # the most likely token always stays
    drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
    return logits.masked_fill(drop, float("-inf"))


def print_stream(tokenizer, prompt, token_ids, eos_id, stream):
    """Print the prompt, then each token as it arrives (bytes decoded incrementally: a character may span tokens),
    up to `eos_id` (None: print <|endoftext|> like any other token). Returns the text after the prompt and its
    number of tokens."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
    pieces = [prompt]
    if stream:
        print(prompt, end="", flush=True)
    for tok in token_ids:
        if tok == eos_id:
            break
        text = decoder.decode(tokenizer.decode_single_token_bytes(tok))
        pieces.append(text)
        if stream:
            print(text, end="", flush=True)
    tokens = len(pieces) - 1  # one piece per token after the prompt
    pieces.append(decoder.decode(b"", final=True))
    print(pieces[-1] if stream else "".join(pieces), flush=True)
    return "".join(pieces[1:]), tokens


def print_samples(tokenizer, prompt, steps, n_samples, eos_id, stream):
    """Print samples decoded together: `steps` yields one token per sample per step (None for a sample that has
    ended). Sample 1 streams as it is generated; the others, which advance at the same pace, are printed when every
    sample has finished. Returns [(text after the prompt, its number of tokens)] per sample."""
    samples = [[] for _ in range(n_samples)]

    def record(step):
        for sample, tok in zip(samples, step):
            if tok is not None:
                sample.append(tok)

    def first_sample():
        for step in steps:
            record(step)
            if step[0] is not None:
                yield step[0]

    if n_samples > 1:
        print("\n===== sample 1 =====")
    texts = [print_stream(tokenizer, prompt, first_sample(), eos_id=eos_id, stream=stream)]
    for step in steps:  # sample 1 may end before the others
        record(step)
    for i, sample in enumerate(samples[1:], start=2):
        print(f"\n===== sample {i} =====")
        texts.append(print_stream(tokenizer, prompt, iter(sample), eos_id=eos_id, stream=False))
    return texts
