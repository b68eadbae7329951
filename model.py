"""GPT-2 in one file (the nanoGPT layout), the classifier on top of it, LoRA as a small wrapper plus functions,
and the DistilRNN student. Needs torch alone (safetensors and huggingface_hub only inside loading).

Module and parameter names follow Hugging Face's GPT-2 (transformer.h.0.attn.c_attn, ...), so checkpoints and
PEFT adapters map onto this model name for name."""
from dataclasses import dataclass, fields
import json
import math
import os
from pathlib import Path

import torch
import torch.nn as nn
import torch.nn.functional as F
from torch.nn.utils.rnn import pack_padded_sequence
from torch.utils.checkpoint import checkpoint


def attention(q, k, v, causal):
    """softmax(q k^T / sqrt(hs)) v for q (B, nh, T, hs) against k, v (B, nh, S, hs), S >= T; with `causal`, query i
    (at position S - T + i) sees keys up to its own position.

    On a CPU, short causal sequences (T <= 64, CoLA's lengths) take the explicit product: the fused kernel's bf16
    backward is slow for them there. Everywhere else the fused kernel runs (CUDA picks its flash kernel).
    """
    T, S = q.size(-2), k.size(-2)
    visible = torch.ones(T, S, dtype=torch.bool, device=q.device).tril(S - T) if causal else None  # (T, S)
    if q.device.type != "cpu" or T > 64 or not causal:
        if causal and T == S:
            return F.scaled_dot_product_attention(q, k, v, is_causal=True)  # lets CUDA pick its flash kernel
        return F.scaled_dot_product_attention(q, k, v, attn_mask=visible)
    att = q @ k.transpose(-2, -1) * (1.0 / math.sqrt(q.size(-1)))  # (B, nh, T, S)
    if causal:
        att = att.masked_fill(~visible, float("-inf"))
    return F.softmax(att, dim=-1, dtype=torch.float32).to(v.dtype) @ v  # (B, nh, T, hs)


class CausalSelfAttention(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.c_attn = nn.Linear(config.n_embd, 3 * config.n_embd)  # q, k, v for all heads in one matmul
        self.c_proj = nn.Linear(config.n_embd, config.n_embd)

    def forward(self, x, cache=None, layer=0):
        B, T, C = x.shape
        qkv = self.c_attn(x).view(B, T, 3, self.n_head, C // self.n_head).permute(2, 0, 3, 1, 4)  # (3, B, nh, T, hs)
        q, k, v = qkv.unbind(0)
        if cache is not None:
            k, v = cache.extend(layer, qkv[1:])  # (B, nh, cached + T, hs) each, in the cache's dtype
            q = q.to(k.dtype)
        # A prompt (T > 1) attends causally; a decode step (T == 1) attends to every cached position.
        y = attention(q, k, v, causal=T > 1)
        y = y.transpose(1, 2).reshape(B, T, C).to(x.dtype)
        return self.c_proj(y)


class MLP(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd)
        self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd)

    def forward(self, x):
        return self.c_proj(F.gelu(self.c_fc(x), approximate="tanh"))  # GPT-2's "gelu_new"


class Block(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.ln_1 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, cache=None, layer=0):
        x = x + self.attn(self.ln_1(x), cache, layer)
        return x + self.mlp(self.ln_2(x))


@dataclass
class GPTConfig:
    block_size: int = 1024
    vocab_size: int = 50257
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    layer_norm_eps: float = 1e-5

    @classmethod
    def from_hf(cls, hf):
        """From the fields of a Hugging Face GPT-2 config.json."""
        return cls(block_size=hf["n_positions"], vocab_size=hf["vocab_size"], n_layer=hf["n_layer"],
                   n_head=hf["n_head"], n_embd=hf["n_embd"], layer_norm_eps=hf.get("layer_norm_epsilon", 1e-5))


EOT = 50256  # <|endoftext|>: GPT-2's end-of-text token, also the padding (never attended to, see GPTClassifier)
LABELS = ("unacceptable", "acceptable")  # CoLA's labels 0 and 1: the classes of a model that names none
# GPT-2's tokenizer has ids 0..50256. A checkpoint may pad its vocabulary past them (nanoGPT's 50304, for faster
# matmuls): those rows stand for no token, so generation never draws them.
BPE_TOKENS = 50257
# Options of transformers' GPT2Config that change what the model computes, and the values this one computes (the
# first is the default); a config with another value (or an MLP other than 4 x n_embd wide) is refused rather than
# run with wrong logits.
ARCHITECTURE = {"activation_function": ("gelu_new", "gelu_pytorch_tanh", "gelu_fast"),  # three names, one function
                "scale_attn_weights": (True,), "scale_attn_by_inverse_layer_idx": (False,)}
# The four released checkpoints (OpenAI's sizes); all share the vocabulary and the 1024-token context.
VARIANTS = {
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}
# OpenAI's checkpoints store these as Conv1D weights (in, out); nn.Linear wants (out, in), so they are transposed.
CONV1D_WEIGHTS = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
# Checkpoint entries that are not parameters of this model: causal-mask buffers, and the head tied to wte.
IGNORED_KEYS = (".attn.bias", ".attn.masked_bias", "lm_head.weight")


class ModelError(Exception):
    """A checkpoint, config or adapter update this file cannot use; run.py prints it as one line, like every error a
    user can fix."""


# ----------------------------------------------------------------------------- loading


def looks_like_path(name):
    """A folder path rather than a Hugging Face id ("name" or "org/name")."""
    return name.startswith(("/", ".", "~")) or name.count("/") > 1


def variant_slug(variant):
    return Path(variant.rstrip("/")).name


def checkpoint_folder(name_or_path, files=("config.json", "*.safetensors", "*.safetensors.index.json")):
    """A local folder as is; a Hugging Face id downloaded (its `files`, with progress bars) and cached."""
    if os.path.isdir(name_or_path):
        return name_or_path
    if looks_like_path(name_or_path):
        raise ModelError(f"--gpt_variant {name_or_path}: no such folder")
    from huggingface_hub import snapshot_download
    try:
        return snapshot_download(name_or_path, allow_patterns=list(files))
    except Exception as e:
        raise ModelError(f"could not get '{name_or_path}' from the Hugging Face hub ({type(e).__name__}); check the "
                         "name and your connection, or pass a local folder with --gpt_variant") from e


def load_config(name_or_path):
    """GPTConfig of one of the four variants (no download), or read from a folder's / hub id's config.json."""
    if name_or_path in VARIANTS and not os.path.isdir(name_or_path):
        return GPTConfig(**VARIANTS[name_or_path])
    folder = checkpoint_folder(name_or_path, files=("config.json",))  # the architecture only, no weights
    path = os.path.join(folder, "config.json")
    try:
        with open(path, encoding="utf-8") as f:
            hf = json.load(f)
        config = GPTConfig.from_hf(hf)
    except (OSError, json.JSONDecodeError, KeyError) as e:
        raise ModelError(f"{path}: not a readable GPT-2 config ({type(e).__name__}: {e})") from None
    for key, values in (ARCHITECTURE | {"n_inner": (4 * config.n_embd, None)}).items():  # None: 4 x n_embd
        if hf.get(key, values[0]) not in values:
            raise ModelError(f"{path}: {key} {hf[key]!r} is a GPT-2 variant this model does not compute (it "
                             f"computes {values[0]!r})")
    if config.vocab_size < BPE_TOKENS:
        raise ModelError(f"{path}: a vocabulary of {config.vocab_size} tokens, fewer than GPT-2's tokenizer has "
                         f"({BPE_TOKENS}), which is what reads the text here")
    return config


def open_checkpoint(folder):
    """{key: function reading that tensor} over a folder's model.safetensors or the shards its index lists.

    Tensors are read one at a time while they are copied, so loading never holds two copies of the weights.
    """
    from safetensors import SafetensorError, safe_open
    index = os.path.join(folder, "model.safetensors.index.json")
    if os.path.exists(index):
        with open(index, encoding="utf-8") as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
    else:
        files = ["model.safetensors"]
    readers = {}
    for name in files:
        path = os.path.join(folder, name)
        if not os.path.exists(path):
            raise ModelError(f"{folder}: no {name} (a GPT-2 folder needs config.json and model.safetensors)")
        try:
            handle = safe_open(path, framework="pt")
        except (SafetensorError, OSError) as e:
            raise ModelError(f"{path}: unreadable or truncated weights ({e})") from None
        readers.update({key: (lambda h=handle, k=key: h.get_tensor(k)) for key in handle.keys()})
    return readers


# ----------------------------------------------------------------------------- GPT

class KVCache:
    """Keys and values of every layer for the tokens seen so far, one row per sample, preallocated for `size`
    positions (default: the block size). A layer's keys and values sit side by side, so that a step writes both
    in one copy."""

    def __init__(self, config, batch_size, device, dtype, size=None):
        self.size = size or config.block_size
        shape = (config.n_layer, 2, batch_size, config.n_head, self.size, config.n_embd // config.n_head)
        self.kv = torch.empty(shape, device=device, dtype=dtype)  # every position is written before it is read
        self.layers = self.kv.unbind(0)  # (2, rows, nh, size, hs) views, one per layer: no indexing per step
        self.length = 0  # positions filled, advanced by GPT.hidden once every layer has written

    def extend(self, layer, kv):
        """Append kv (2, B, nh, T, hs), the new keys and values, in place; return the keys and the values so far,
        each (B, nh, length + T, hs), views of the cache.

        A batch of one is written to every row: that is how samples share a single prefill of their prompt.
        """
        T, B = kv.size(3), kv.size(1)
        cache = self.layers[layer]  # (2, rows, nh, size, hs)
        cache.narrow(3, self.length, T).copy_(kv)
        if B < cache.size(1):
            cache = cache.narrow(1, 0, B)
        return cache.narrow(3, 0, self.length + T).unbind(0)

    def reorder(self, rows):
        """Go on with these batch rows, in this order, a row possibly more than once: the samples that have not
        ended, or the parents of the beams a beam-search step keeps."""
        self.kv = self.kv.index_select(2, rows)
        self.layers = self.kv.unbind(0)


class GPT(nn.Module):

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.transformer = nn.ModuleDict(dict(
            wte=nn.Embedding(config.vocab_size, config.n_embd),
            wpe=nn.Embedding(config.block_size, config.n_embd),
            h=nn.ModuleList([Block(config) for _ in range(config.n_layer)]),
            ln_f=nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps),
        ))
        self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
        self.lm_head.weight = self.transformer.wte.weight  # tied, as in GPT-2
        self.apply(self._init_weights)
        self.grad_checkpoint = False  # recompute each block in the backward pass (see `hidden`)

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (nn.Linear, nn.Embedding)):
            nn.init.normal_(module.weight, mean=0.0, std=0.02)
        if isinstance(module, nn.Linear) and module.bias is not None:
            nn.init.zeros_(module.bias)

    def hidden(self, idx, cache=None):
        """Final hidden states (B, T, n_embd) of the tokens `idx` (B, T), which follow those already in `cache`."""
        start = cache.length if cache is not None else 0
        if start + idx.size(1) > self.config.block_size:
            raise ValueError(f"{start + idx.size(1)} positions exceed the block size {self.config.block_size}")
        x = self.transformer.wte(idx) + self.transformer.wpe.weight[start:start + idx.size(1)]  # positions' rows
        recompute = self.grad_checkpoint and self.training and torch.is_grad_enabled() and cache is None
        for layer, block in enumerate(self.transformer.h):
            if recompute:  # keep the block's input alone; non-reentrant: frozen inputs need no requires_grad
                x = checkpoint(block, x, use_reentrant=False)
            else:
                x = block(x, cache, layer)
        if cache is not None:
            cache.length += idx.size(1)
        return self.transformer.ln_f(x)

    def forward(self, idx, cache=None):
        """Next-token logits (B, T, vocab) for every position."""
        return self.lm_head(self.hidden(idx, cache))

    # ------------------------------------------------------------------ loading

    @classmethod
    def from_pretrained(cls, name_or_path, **kwargs):
        """GPT-2 weights from a Hugging Face id (downloaded once, then cached) or a local folder in its format."""
        folder = checkpoint_folder(name_or_path)
        model = cls(load_config(folder), **kwargs)
        model.load_gpt2_weights(open_checkpoint(folder), source=name_or_path)
        return model

    @classmethod
    def from_random(cls, name_or_path, **kwargs):
        """The architecture of a variant or folder with random weights: nothing is downloaded for the four variants."""
        return cls(load_config(name_or_path), **kwargs)

    def load_gpt2_weights(self, tensors, source):
        """Copy a Hugging Face GPT-2 checkpoint ({key: tensor, or a function returning it}) into self.transformer,
        one tensor at a time, refusing any key or shape mismatch."""
        theirs = {k.removeprefix("transformer."): k for k in tensors
                  if not k.endswith(IGNORED_KEYS) and k != "score.weight"}
        ours = self.transformer.state_dict()
        missing, unexpected = sorted(ours.keys() - theirs.keys()), sorted(theirs.keys() - ours.keys())
        if missing or unexpected:
            raise ModelError(f"{source}: not a GPT-2 checkpoint of this shape (missing {missing[:3]}, "
                             f"unexpected {unexpected[:3]})")
        with torch.no_grad():
            for key, their_key in theirs.items():
                value = tensors[their_key]
                value = value() if callable(value) else value
                if key.endswith(CONV1D_WEIGHTS):
                    value = value.t()
                if value.shape != ours[key].shape:
                    raise ModelError(f"{source}: {key} has shape {tuple(value.shape)}, "
                                     f"expected {tuple(ours[key].shape)}")
                ours[key].copy_(value)

    # ------------------------------------------------------------------ saving in transformers' format

    def hf_config(self):
        """config.json of this model for transformers' GPT2LMHeadModel (the head tied to wte, its default)."""
        c = self.config
        return {"model_type": "gpt2", "architectures": ["GPT2LMHeadModel"], "vocab_size": c.vocab_size,
                "n_positions": c.block_size, "n_embd": c.n_embd, "n_layer": c.n_layer, "n_head": c.n_head,
                "layer_norm_epsilon": c.layer_norm_eps, "activation_function": "gelu_new",
                "bos_token_id": 50256, "eos_token_id": 50256, "pad_token_id": 50256}  # padding = <|endoftext|>

    def hf_state_dict(self):
        """The weights in transformers' GPT-2 layout: Conv1D weights are (in, out); lm_head is wte, not stored."""
        return {key: value.t() if key.endswith(CONV1D_WEIGHTS) else value
                for key, value in self.state_dict().items() if not key.startswith("lm_head.")}

    # ------------------------------------------------------------------ generation

    def new_cache(self, batch_size=1, size=None):
        """An empty KVCache for decoding. On a CPU it is fp32 whatever the weights, so attention runs in fp32 there:
        torch's CPU kernel runs one-query attention far slower in bf16 than in fp32, even where bf16 matmuls are
        native, and fp32 keys and values lose nothing. A bf16 step then casts the queries up and the output down."""
        p = self.transformer.wte.weight
        dtype = torch.float32 if p.device.type == "cpu" else p.dtype
        return KVCache(self.config, batch_size, p.device, dtype, size)

    @torch.no_grad()
    def generate(self, prompt, max_new_tokens, sampler, eos_id=None, use_cache=True):
        """Yield up to `max_new_tokens` token ids continuing the list `prompt`, one at a time: one sample of
        `generate_batch`."""
        for step in self.generate_batch(prompt, max_new_tokens, [sampler], eos_id, use_cache):
            yield step[0]

    @torch.no_grad()
    def generate_batch(self, prompt, max_new_tokens, samplers, eos_id=None, use_cache=True):
        """Yield, for each step, a list with the next token id of every sample continuing the list `prompt`, or
        sample i continuing prompt[i] when `prompt` is a list of token lists, all of one length (one sample per
        sampler; None for a sample that has already yielded `eos_id`).

        The samples share one read of one prompt (a batch of one, its keys copied to every cache row); prompts of
        one length are read together, one row each, with no padding, so no attention mask. Then the samples
        decode together, one row each. Each sample draws with its own sampler, so sample i is the same as when drawn
        alone with that sampler (up to rounding: a batch's products round differently from one row's, by about 1e-6
        in fp32 logits). A sample that ends leaves the batch. The model sees at most block_size tokens: past that
        the window slides, and because positions are absolute the cached keys go stale, so each step then re-reads
        the whole window.
        """
        shared = not prompt or not isinstance(prompt[0], (list, tuple))  # one prompt for every sample
        tokens = [list(prompt) if shared else list(prompt[i]) for i in range(len(samplers))]
        if len({len(t) for t in tokens}) > 1:
            raise ValueError("prompts decoded together have one length: positions are absolute, with no padding")
        live = list(range(len(samplers)))  # the samples still running, in batch-row order
        size = min(self.config.block_size, len(tokens[0]) + max_new_tokens)  # the most positions the cache holds
        device = self.transformer.wte.weight.device
        cache = None
        for step in range(max_new_tokens):
            if step == 0:  # one shared prompt is read once; prompts of one length in one batch
                idx = torch.tensor([t[-self.config.block_size:] for t in tokens[:1 if shared else None]],
                                   device=device)  # (1 or n, T)
                cache = self.new_cache(len(live), size) if use_cache else None
            elif cache is not None and cache.length < cache.size:
                idx = torch.tensor([tokens[i][-1:] for i in live], device=device)  # (n, 1)
            else:
                idx = torch.tensor([tokens[i][-self.config.block_size:] for i in live], device=device)  # (n, T)
                cache = self.new_cache(len(live)) if use_cache else None
            hidden = self.hidden(idx, cache)[:, -1]  # (1 or n, n_embd): the prompt's other positions are unused
            logits = self.lm_head(hidden)[:, :BPE_TOKENS].expand(len(live), -1)  # (n, tokens), the model's dtype
            next_ids = [None] * len(samplers)
            for row, i in enumerate(live):
                next_ids[i] = samplers[i](logits[row], tokens[i])
                tokens[i].append(next_ids[i])
            yield next_ids
            going = [row for row, i in enumerate(live) if next_ids[i] != eos_id]
            if len(going) < len(live):
                live = [live[row] for row in going]
                if not live:
                    return
                if cache is not None:
                    cache.reorder(torch.tensor(going, device=device))


# ----------------------------------------------------------------------------- classification

class GPTClassifier(GPT):
    """GPT-2 with a `score` head (n_embd -> n_classes, no bias) on the last real token, like HF's
    GPT2ForSequenceClassification; `labels` names the classes (CoLA's two by default).

    Batches are right-padded. Attention is causal, so a real token never sees the padding after it: the hidden
    state of the last real token is the same with or without padding, and no attention mask is needed.
    """

    def __init__(self, config, labels=LABELS):
        super().__init__(config)
        self.labels, self.n_classes = tuple(labels), len(labels)
        self.score = nn.Linear(config.n_embd, self.n_classes, bias=False)
        nn.init.normal_(self.score.weight, std=0.02)

    def hf_config(self):
        """config.json of this classifier for transformers' GPT2ForSequenceClassification."""
        return super().hf_config() | {"architectures": ["GPT2ForSequenceClassification"],
                                      "id2label": {str(i): name for i, name in enumerate(self.labels)},
                                      "label2id": {name: i for i, name in enumerate(self.labels)}}

    def forward(self, idx, lengths):
        h = self.hidden(idx)  # (B, T, n_embd)
        last = h[torch.arange(idx.size(0), device=idx.device), lengths - 1]  # (B, n_embd)
        return self.score(last)


def cast_frozen_linears(model, dtype):
    """Store the frozen linear layers of the blocks in `dtype` (bf16/fp16 training and inference).

    Under autocast every matmul reads its weights in that dtype anyway, so the results are identical, while
    memory halves and the per-step casts disappear. LayerNorms, embeddings and trainable tensors stay fp32.
    """
    if dtype == torch.float32:
        return model
    for module in model.transformer.h.modules():
        if isinstance(module, nn.Linear) and not any(p.requires_grad for p in module.parameters()):
            module.to(dtype)
    return model


def count_parameters(model):
    """(all, trainable) parameters, a tied weight counted once."""
    params = list(model.parameters())  # parameters() already yields a shared tensor once
    return sum(p.numel() for p in params), sum(p.numel() for p in params if p.requires_grad)


# ----------------------------------------------------------------------------- LoRA
# All that LoRA means to the model: the layer, where it goes, what trains, merging. The GPT and classifier code
# above never mentions it; PEFT's format on disk is in checkpoints.py.

LORA_TARGETS = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")


class LoRALinear(nn.Module):
    """A frozen linear layer plus a trainable low-rank update: y = W x + b + s * B(A(dropout(x))), s = alpha / r
    (rsLoRA: alpha / sqrt(r), so that the update's size does not shrink as the rank grows).

    DoRA (`dora`) also learns a magnitude m per output feature and uses W' = m * (W + s B A) / ||W + s B A||, each
    row's norm (a column of GPT-2's Conv1D weight) computed from the current B A but detached from the gradient, as
    PEFT does after the DoRA paper (sec. 4.3). m starts at ||W||, so an untrained DoRA layer computes W x + b too.
    B starts at zero, so an untrained LoRA adapter leaves the layer's output unchanged, bit for bit (DoRA's up to
    rounding).
    """

    def __init__(self, base, rank, alpha, dropout=0.0, rslora=False, dora=False):
        super().__init__()
        self.base = base
        self.lora_A = nn.Linear(base.in_features, rank, bias=False, device=base.weight.device)
        self.lora_B = nn.Linear(rank, base.out_features, bias=False, device=base.weight.device)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.rank, self.alpha, self.rslora = rank, alpha, rslora
        self.scaling = alpha / math.sqrt(rank) if rslora else alpha / rank
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        # PEFT's name, so that the adapter's key is ...c_attn.lora_magnitude_vector, as PEFT saves it
        self.lora_magnitude_vector = nn.Parameter(self.weight_norm()) if dora else None
        self.merged = False

    @property
    def dora(self):
        return self.lora_magnitude_vector is not None

    def weight_norm(self):
        """||W + s B A|| of each output feature (row of W), in fp32, detached from the gradient."""
        with torch.no_grad():
            return torch.linalg.vector_norm(self.base.weight.float() + self.delta_weight().float(), dim=1)

    def forward(self, x):
        y = self.base(x)
        if self.merged:
            return y
        x_dropped = self.dropout(x)
        update = self.lora_B(self.lora_A(x_dropped))
        if not self.dora:
            return y.add(update, alpha=self.scaling)  # one pass, not mul then add
        # PEFT's form: y + (m/n - 1) W x' + (m/n) s B A x' with x' the dropped-out input (x itself without dropout)
        factor = self.dora_factor()  # (out,)
        if x_dropped is x:
            base = y if self.base.bias is None else y - self.base.bias
        else:
            base = F.linear(x_dropped, self.base.weight)
        return y + (factor - 1) * base + factor * self.scaling * update

    def delta_weight(self):
        return (self.lora_B.weight @ self.lora_A.weight) * self.scaling

    def dora_factor(self):
        """DoRA's m / ||W + s B A|| per output feature (None without DoRA): W' = factor * (W + s B A)."""
        return self.lora_magnitude_vector / self.weight_norm() if self.dora else None

    @torch.no_grad()
    def merge(self):
        """Fold the update into W, so inference costs one matmul."""
        if self.merged:
            return
        weight, factor = self.base.weight.float() + self.delta_weight().float(), self.dora_factor()
        if factor is not None:
            weight *= factor[:, None]
        if not torch.isfinite(weight).all():
            raise ModelError("refusing to merge a LoRA update that holds NaN or inf")
        self.merged_factor = factor  # for unmerge: the norm is of the unmerged weight
        self.base.weight.copy_(weight)
        self.merged = True

    @torch.no_grad()
    def unmerge(self):
        """Take the update back out of W (equal to the original up to float rounding)."""
        if self.merged:
            weight = self.base.weight.float()
            if self.merged_factor is not None:
                weight /= self.merged_factor[:, None]
            self.base.weight.copy_(weight - self.delta_weight().float())
            self.merged = False


def target_slots(model, targets=LORA_TARGETS):
    """(parent module, attribute name) of each `targets` layer in every block, e.g. (block.attn, "c_attn")."""
    for block in model.transformer.h:
        for target in targets:
            parent_name, child_name = target.split(".")
            yield getattr(block, parent_name), child_name


def inject_lora(model, rank, alpha, dropout=0.0, targets=LORA_TARGETS, rslora=False, dora=False):
    """Wrap the `targets` linear layers of every block in LoRALinear (rsLoRA's scale, DoRA's magnitude: see there)."""
    for parent, name in target_slots(model, targets):
        setattr(parent, name, LoRALinear(getattr(parent, name), rank, alpha, dropout, rslora, dora))
    return model


def lora_layers(model):
    return [m for m in model.modules() if isinstance(m, LoRALinear)]


def merge_lora(model):
    for layer in lora_layers(model):
        layer.merge()


def unmerge_lora(model):
    for layer in lora_layers(model):
        layer.unmerge()


def fold_lora(model):
    """Merge every LoRA update into its weight and put the plain layer back in its place: the model no longer knows
    LoRA existed (for inference and export)."""
    for parent, name in target_slots(model):
        layer = getattr(parent, name)
        if isinstance(layer, LoRALinear):
            layer.merge()
            setattr(parent, name, layer.base)
    return model


def mark_only_lora_as_trainable(model):
    """Train exactly the LoRA matrices (and DoRA's magnitudes), every LayerNorm, and the task head; freeze the rest."""
    mark_head_as_trainable(model)
    for module in lora_layers(model):
        module.lora_A.requires_grad_(True)
        module.lora_B.requires_grad_(True)
        if module.dora:
            module.lora_magnitude_vector.requires_grad_(True)
    return model


def mark_head_as_trainable(model):
    """Train every LayerNorm and the task head on top of the pretrained body (every child module besides
    `transformer` and the tied `lm_head`: the classifier's `score`); freeze the rest. Alone, the linear probe."""
    model.requires_grad_(False)
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.requires_grad_(True)
    for name, child in model.named_children():
        if name not in ("transformer", "lm_head"):
            child.requires_grad_(True)
    return model


# What each --method trains (LoRA injected first for "lora"); "full" trains every weight, the tied one once.
METHODS = {"lora": mark_only_lora_as_trainable, "head": mark_head_as_trainable,
           "full": lambda model: model.requires_grad_(True)}


# ----------------------------------------------------------------------------- the student

@dataclass
class RNNConfig:
    vocab_size: int = 50257
    hidden: int = 768
    layers: int = 2
    cell: str = "rnn"
    labels: tuple = LABELS  # the class names; a checkpoint from before labels were saved is CoLA's

    def __post_init__(self):
        self.labels = tuple(self.labels)

    @classmethod
    def from_dict(cls, d):
        return cls(**{f.name: d[f.name] for f in fields(cls) if f.name in d})


class DistilRNN(nn.Module):
    """The student: token embedding -> multi-layer RNN -> linear head on the last real token's hidden state.

    Sequences are packed by length, so padding steps never run through the RNN nor reach the head.
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.labels, self.n_classes = config.labels, len(config.labels)
        cells = {"rnn": lambda *a, **k: nn.RNN(*a, nonlinearity="relu", **k), "gru": nn.GRU, "lstm": nn.LSTM}
        self.embed = nn.Embedding(config.vocab_size, config.hidden)
        self.rnn = cells[config.cell](config.hidden, config.hidden, num_layers=config.layers, batch_first=True)
        self.head = nn.Linear(config.hidden, self.n_classes)

    def forward(self, idx, lengths):
        packed = pack_padded_sequence(self.embed(idx), lengths.cpu(), batch_first=True, enforce_sorted=False)
        _, h = self.rnn(packed)
        if isinstance(h, tuple):  # an LSTM returns (h, c)
            h = h[0]
        return self.head(h[-1])  # top layer's state after each sequence's last real token
