"""Beam search with transformers' semantics (GenerationMixin._beam_search, do_sample=False), for one prompt.

Each step scores every continuation of every running beam by its summed log-probability, keeps the 2K best
candidates, and splits them: those that end (at <|endoftext|> or at the last allowed token) and rank among the K
best become finished hypotheses, scored sum / length ** length_penalty; the K best that go on are next step's
beams. The K beams share one KV cache whose rows are reordered to follow their parents, so no prefix is recomputed.
The result is the best finished hypothesis, as transformers returns it.
"""
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from decoding.sampling import apply_repetition_penalty, ban_repeated_ngrams
from model import BPE_TOKENS

NEG = -1.0e9  # transformers' "impossible" score: added, not assigned, so the order among such scores is the same


@dataclass
class BeamSettings:
    num_beams: int
    length_penalty: float = 1.0  # > 0 favours longer hypotheses, < 0 shorter ones
    no_repeat_ngram_size: int = 0  # 0: none; n: no n-gram occurs twice in prompt + output
    early_stopping: object = False  # True: stop once K hypotheses end; False: transformers' heuristic; "never"
    repetition_penalty: float = 1.0


def beam_settings(decode):
    """The BeamSettings of gen's decoding flags (config.sections.DecodeSettings), or None without beams."""
    if decode.num_beams == 1:
        return None
    early = {None: False, "false": False, "true": True, "never": "never"}[decode.early_stopping]
    return BeamSettings(decode.num_beams, 1.0 if decode.length_penalty is None else decode.length_penalty,
                        decode.no_repeat_ngram_size, early, decode.repetition_penalty)


def next_log_probs(logits, contexts, settings):
    """log_softmax of each beam's logits (rows, vocab), then the repetition penalty and the n-gram ban."""
    log_probs = F.log_softmax(logits, dim=-1)
    return torch.stack([ban_repeated_ngrams(apply_repetition_penalty(row, context, settings.repetition_penalty),
                                            context, settings.no_repeat_ngram_size)
                        for row, context in zip(log_probs, contexts)])


class Hypotheses:
    """The K best finished hypotheses so far: tokens, scores (K,) and which slots are filled (K,)."""

    def __init__(self, k):
        self.tokens, self.scores = [[] for _ in range(k)], torch.full((k,), NEG)
        self.filled = torch.zeros(k, dtype=torch.bool)

    def add(self, candidates, scores, ended, length, settings, improvable):
        """Merge the candidates that end (`ended`: among the K best of the 2K) scored at `length` tokens."""
        k = len(self.tokens)
        scores = scores / (length ** settings.length_penalty)
        scores = scores + float(bool(self.filled.all()) and settings.early_stopping is True) * NEG
        scores = scores + float(not improvable) * NEG
        scores = scores + (~ended).float() * NEG
        merged = torch.cat((self.scores, scores))
        best = torch.topk(merged, k).indices.tolist()
        pool, flags = self.tokens + candidates, torch.cat((self.filled, ended))
        self.tokens, self.scores, self.filled = [pool[i] for i in best], merged[best], flags[best]

    def improvable(self, best_running, length, settings, max_new_tokens):
        """transformers' early-stop heuristic: can the best running beam still beat the worst hypothesis kept?"""
        if settings.early_stopping == "never" and settings.length_penalty > 0.0:
            length = max_new_tokens
        best_possible = best_running / (length ** settings.length_penalty)
        worst = torch.where(self.filled, self.scores.min(), torch.tensor(NEG))
        return bool((best_possible > worst).any())


@torch.no_grad()
def beam_search(model, prompt, max_new_tokens, settings, eos_id=None):
    """The generated token ids (ending with `eos_id` if the best hypothesis ends there) continuing `prompt`."""
    k, device = settings.num_beams, model.transformer.wte.weight.device
    if len(prompt) + max_new_tokens > model.config.block_size:
        raise ValueError(f"beam search keeps prompt and output in the context: {len(prompt)} + {max_new_tokens} "
                         f"tokens exceed the block size {model.config.block_size}")
    cache = model.new_cache(k, len(prompt) + max_new_tokens)
    beams, scores = [[]], torch.tensor([0.0])  # the first step reads the prompt once and extends beam 0 alone
    finished, improvable = Hypotheses(k), True
    idx = torch.tensor([prompt], device=device)  # (1, T)
    for step in range(max_new_tokens):
        logits = model.lm_head(model.hidden(idx, cache)[:, -1])[:, :BPE_TOKENS].float().cpu()  # (rows, vocab)
        log_probs = next_log_probs(logits, [prompt + b for b in beams], settings) + scores[:, None]
        top, flat = torch.topk(log_probs.flatten(), 2 * k)  # (2K,) among all beams' continuations
        parents, tokens = (flat // BPE_TOKENS).tolist(), (flat % BPE_TOKENS).tolist()
        candidates = [beams[p] + [t] for p, t in zip(parents, tokens)]
        ends = torch.tensor([t == eos_id or step + 1 == max_new_tokens for t in tokens])
        going = torch.topk(top + ends.float() * NEG, k).indices.tolist()
        finished.add(candidates, top, ends & (torch.arange(2 * k) < k), step + 1, settings, improvable)
        if step + 1 == max_new_tokens or bool(ends.all()):
            break
        beams, scores = [candidates[i] for i in going], (top + ends.float() * NEG)[going]
        cache.reorder(torch.tensor([parents[i] for i in going], device=device))
        improvable = improvable and finished.improvable(float(scores[0]), step + 1, settings, max_new_tokens)
        if not improvable or (bool(finished.filled.all()) and settings.early_stopping is True):
            break
        idx = torch.tensor([[b[-1]] for b in beams], device=device)  # (K, 1)
    return finished.tokens[0]
