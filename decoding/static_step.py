"""A decode step with static shapes, which torch.compile captures as one graph (`gen --compile`).

What gpt-fast and Hugging Face's static cache do: the KV cache is preallocated and written at positions given as a
tensor, every step attends to the whole cache through a mask of the positions filled so far, a sample that ends
stays in the batch (its tokens are dropped), and the next token is drawn on the device from one uniform per sample,
drawn on the host by that sample's own seeded generator. Nothing in a step depends on a Python value that changes,
so the graph compiled at the first step serves every later step and every prompt. The prompt is read by the same
function uncompiled, as HF does (its length varies; compiling it would compile once per length). The model's
modules are used as they are: int8 and plain linears alike.
"""
import torch
import torch.nn.functional as F

from decoding.sampling import draw, penalize_seen
from model import BPE_TOKENS


def attend(attn, x, kv, pos, visible):
    """attn (a CausalSelfAttention) on x (B, T, C) at positions pos (T,): its keys and values are written into kv
    (2, rows, nh, S, hs) at those positions, then the queries attend to the `visible` (T, S) positions of the cache.

    A batch of one (the prompt shared by every sample) is written to every row, as KVCache does. The write is an
    index_put_ on the layer's own tensor, which inductor keeps in place (gpt-fast's form)."""
    B, T, C = x.shape
    qkv = attn.c_attn(x).view(B, T, 3, attn.n_head, C // attn.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
    kv[:, :, :, pos] = qkv[1:].to(kv.dtype)  # (2, B, nh, T, hs): a view when the dtypes agree
    k, v = kv[:, :B].unbind(0)  # (B, nh, S, hs) each
    y = F.scaled_dot_product_attention(qkv[0].to(kv.dtype), k, v, attn_mask=visible)  # (B, nh, T, hs)
    return attn.c_proj(y.transpose(1, 2).reshape(B, T, C).to(x.dtype))


def last_hidden(model, idx, pos, kv):
    """Final hidden state (B, n_embd) of the last of the tokens idx (B, T) at positions pos (T,), their keys and
    values written into kv, one (2, rows, nh, S, hs) tensor per layer; query at position p sees positions up to p."""
    t = model.transformer
    visible = torch.arange(kv[0].size(3), device=idx.device) <= pos[:, None]  # (T, S)
    x = t.wte(idx) + t.wpe(pos)  # (B, T, n_embd)
    for layer, block in enumerate(t.h):
        x = x + attend(block.attn, block.ln_1(x), kv[layer], pos, visible)
        x = x + block.mlp(block.ln_2(x))
    return t.ln_f(x[:, -1])


def decode_step(model, idx, pos, kv, seen, u, settings):
    """The next token (rows,) of every sample after the tokens idx (1 or rows, T) at positions pos (T,), their keys
    and values written into kv (see last_hidden).

    seen (rows, vocab) marks each sample's context for the repetition penalty and gets the new tokens; u (rows,)
    are the uniforms of the draws; settings (temperature, top_k, top_p, repetition_penalty) are Sampler's."""
    temperature, top_k, top_p, penalty = settings
    logits = model.lm_head(last_hidden(model, idx, pos, kv))[:, :BPE_TOKENS].float().expand(u.size(0), -1)
    if penalty != 1.0:
        logits = penalize_seen(logits, seen, penalty)
    next_ids = logits.argmax(-1) if temperature == 0 else draw(logits, u, temperature, top_k, top_p)
    seen.scatter_(1, next_ids[:, None], True)
    return next_ids


def cache_size(positions, block_size):
    """Positions of the cache for `positions` tokens: the next power of two from 64, at most the block size. The
    cache's shape is the step's, so prompts of different lengths share a compiled step; a step attends to the whole
    cache, so it is no larger than that."""
    return min(block_size, max(64, 1 << (positions - 1).bit_length()))


class StaticDecoder:
    """GPT.generate_batch through decode_step, compiled with `compile`: on a CPU by inductor's C++ code, on CUDA
    with CUDA graphs (mode="reduce-overhead"), both as one graph (fullgraph=True) with static shapes."""

    def __init__(self, model, compile=True):
        self.model = model
        self.device = model.transformer.wte.weight.device
        self.prefill = self.step = lambda *args: decode_step(model, *args)
        self.kept = {}
        if compile:
            mode = "reduce-overhead" if self.device.type == "cuda" else None
            self.step = torch.compile(self.step, fullgraph=True, dynamic=False, mode=mode)

    def buffers(self, n, size):
        """The KV cache (a tensor per layer) and the seen-token mask (cleared) for n samples and `size` positions,
        kept from call to call, since CUDA graphs replay on the addresses they were recorded with. The cache starts
        at zero: a masked position weighs 0 in attention, and 0 times what uninitialised memory holds may be NaN."""
        if (n, size) not in self.kept:
            layer = self.model.new_cache(n, size=1).kv[0]  # (2, n, nh, 1, hs) in the cache's dtype
            kv = [layer.new_zeros(*layer.shape[:3], size, layer.size(4)) for _ in range(self.model.config.n_layer)]
            seen = torch.zeros(n, BPE_TOKENS, dtype=torch.bool, device=self.device)
            if self.device.type == "cuda":
                for t in (*kv, seen):
                    torch._dynamo.mark_static_address(t)
            self.kept = {(n, size): (kv, seen)}  # one set at a time
        kv, seen = self.kept[(n, size)]
        return kv, seen.zero_()

    @torch.no_grad()
    def generate_batch(self, prompt, max_new_tokens, samplers, eos_id=None):
        """What GPT.generate_batch yields (for each step a list of every sample's token, None once it has ended),
        with every sample drawn by the same settings (each with its own generator) and every step at the same
        shapes. Past the block size the window slides and each step re-reads it, uncompiled, as generate_batch
        does."""
        settings = {(s.temperature, s.top_k, s.top_p, s.repetition_penalty) for s in samplers}
        if len(settings) != 1:
            raise ValueError("a static decode draws every sample with the same sampling settings")
        settings, n, block = settings.pop(), len(samplers), self.model.config.block_size
        size = cache_size(len(prompt) + max_new_tokens, block)
        kv, seen = self.buffers(n, size)
        seen[:, sorted(set(prompt))] = True
        tokens = [list(prompt) for _ in samplers]
        ended = [False] * n
        for step in range(max_new_tokens):
            u = torch.zeros(n) if settings[0] == 0 else torch.stack([torch.rand((), generator=s.generator)
                                                                     for s in samplers])
            u = u.to(self.device)
            filled = min(len(tokens[0]) - 1, block)  # positions of the cache already holding keys and values
            if step > 0 and filled < size:
                idx = torch.tensor([t[-1:] for t in tokens], device=self.device)  # (n, 1)
                pos = torch.tensor([filled], device=self.device)
                if self.device.type == "cuda":
                    torch.compiler.cudagraph_mark_step_begin()
                next_ids = self.step(idx, pos, kv, seen, u, settings).tolist()
            else:  # the prompt, shared by every sample (a batch of one), or a window that has slid
                window = [t[-block:] for t in (tokens[:1] if step == 0 else tokens)]
                idx = torch.tensor(window, device=self.device)  # (1 or n, T)
                pos = torch.arange(idx.size(1), device=self.device)
                next_ids = self.prefill(idx, pos, kv, seen, u, settings).tolist()
            for t, tok in zip(tokens, next_ids):
                t.append(tok)
            yield [None if done else tok for done, tok in zip(ended, next_ids)]
            ended = [done or tok == eos_id for done, tok in zip(ended, next_ids)]
            if all(ended):
                return
