"""GPT-2: same function as transformers' GPT2LMHeadModel, loading, KV-cache generation, sampling filters, CLI."""
import pytest
import torch
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, TopKLogitsWarper, TopPLogitsWarper

from cli import commands
from conftest import run_cli, run_main, save_tiny_gpt2
from decoding.int8_linears import Int8Linear, quantize_int8
from decoding.packed_weights import OneDNNPackedLinear, PackedLinear, prepare_for_generation
from decoding.sampling import Sampler, apply_repetition_penalty, top_k_candidates, top_p_filter
from model import BPE_TOKENS, GPT, GPTConfig, ModelError
from runtime.devices import has_fast_bf16


@pytest.fixture(scope="module")
def pair(tiny_gpt_dir):
    return GPT.from_pretrained(tiny_gpt_dir).eval(), GPT2LMHeadModel.from_pretrained(tiny_gpt_dir).eval()


def test_logits_match_transformers(pair):
    ours, hf = pair
    idx = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        diff = (ours(idx) - hf(idx).logits).abs().max()
    assert diff <= 1e-4


def test_logits_match_transformers_with_right_padding(pair):
    ours, hf = pair
    lengths = [20, 7, 13]
    idx = torch.randint(0, 50257, (3, 20), generator=torch.Generator().manual_seed(2))
    mask = torch.zeros(3, 20, dtype=torch.long)
    for row, n in enumerate(lengths):
        idx[row, n:] = 50256
        mask[row, :n] = 1
    with torch.no_grad():
        a, b = ours(idx), hf(idx, attention_mask=mask).logits
    for row, n in enumerate(lengths):
        assert (a[row, :n] - b[row, :n]).abs().max() <= 1e-4


def test_greedy_with_cache_equals_without_and_transformers(pair):
    ours, hf = pair
    prompt = [464, 2068, 7586, 21831]
    greedy = Sampler(temperature=0)
    cached = list(ours.generate(prompt, 60, greedy, use_cache=True))
    uncached = list(ours.generate(prompt, 60, greedy, use_cache=False))
    hf.generation_config.eos_token_id = None
    reference = hf.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, pad_token_id=50256)
    assert len(cached) == 60
    assert cached == uncached == reference[0, len(prompt):].tolist()


@pytest.mark.skipif(not torch.backends.mkl.is_available(), reason="this torch has no MKL (packed products)")
def test_samples_decode_through_packed_weights_and_keep_the_head_tied(tiny_gpt_dir, pair):
    _, hf = pair
    ours = prepare_for_generation(GPT.from_pretrained(tiny_gpt_dir), torch.device("cpu"), torch.float32, rows=3)
    assert isinstance(ours.transformer.h[0].mlp.c_fc, PackedLinear) and isinstance(ours.lm_head, PackedLinear)
    assert ours.lm_head.linear.weight is ours.transformer.wte.weight  # the head is still the embedding
    prompt = [464, 2068, 7586, 21831]
    hf.generation_config.eos_token_id = None
    reference = hf.generate(torch.tensor([prompt]), max_new_tokens=50, do_sample=False, pad_token_id=50256)
    steps = ours.generate_batch(prompt, 50, [Sampler(temperature=0)] * 3)
    assert list(steps) == [[tok] * 3 for tok in reference[0, len(prompt):].tolist()]


@pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="this torch has no oneDNN (packed products)")
def test_fp32_one_sample_decodes_through_onednn_packed_weights_with_the_plain_tokens(tiny_gpt_dir):
    cpu, prompt = torch.device("cpu"), [464, 2068, 7586, 21831, 625, 262]
    packed = prepare_for_generation(GPT.from_pretrained(tiny_gpt_dir), cpu, torch.float32)
    plain = GPT.from_pretrained(tiny_gpt_dir).eval()  # nn.Linear: torch's ordinary product
    assert isinstance(packed.transformer.h[0].mlp.c_proj, OneDNNPackedLinear)
    assert isinstance(packed.lm_head, OneDNNPackedLinear)
    assert packed.lm_head.linear.weight is packed.transformer.wte.weight  # the head is still the embedding
    with torch.no_grad():
        caches = [m.new_cache(1, 8) for m in (packed, plain)]
        steps = [[m(torch.tensor([prompt[:-1]]), c), m(torch.tensor([prompt[-1:]]), c)]
                 for m, c in zip((packed, plain), caches)]
    assert all((a - b).abs().max() <= 1e-5 for a, b in zip(*steps))  # the prompt, then a step through the cache
    assert list(packed.generate(prompt, 40, Sampler(0.8, top_k=40, seed=3))) == list(
        plain.generate(prompt, 40, Sampler(0.8, top_k=40, seed=3)))


@pytest.mark.skipif(not (has_fast_bf16(torch.device("cpu")) and torch.backends.mkldnn.is_available()),
                    reason="bf16 is not native on this CPU, or this torch has no oneDNN (packed bf16 products)")
def test_bf16_decodes_through_packed_weights_with_the_plain_products_logits(tiny_gpt_dir):
    cpu, prompt = torch.device("cpu"), [464, 2068, 7586, 21831, 625, 262]
    packed = prepare_for_generation(GPT.from_pretrained(tiny_gpt_dir), cpu, torch.bfloat16)
    plain = GPT.from_pretrained(tiny_gpt_dir).to(torch.bfloat16).eval()  # nn.Linear: torch's ordinary product
    assert isinstance(packed.transformer.h[0].attn.c_attn, OneDNNPackedLinear)
    assert isinstance(packed.lm_head, OneDNNPackedLinear)
    assert packed.lm_head.linear.weight is packed.transformer.wte.weight  # the head is still the embedding
    with torch.no_grad():
        for batch in (torch.tensor([prompt]), torch.tensor([prompt, prompt[::-1], prompt[1:] + [11]])):
            caches = [m.new_cache(batch.size(0), 8) for m in (packed, plain)]
            steps = [[m(batch[:, :-1], c), m(batch[:, -1:], c)] for m, c in zip((packed, plain), caches)]
            assert all(torch.equal(a, b) for a, b in zip(*steps))  # the same products, bit for bit
    assert list(packed.generate(prompt, 20, Sampler(0.8, top_k=40, seed=3))) == list(
        plain.generate(prompt, 20, Sampler(0.8, top_k=40, seed=3)))


def test_bf16_decoding_attends_in_fp32_and_stays_close_to_fp32(tiny_gpt_dir):
    cpu, prompt = torch.device("cpu"), torch.tensor([[464, 2068, 7586, 21831, 625, 262]])
    logits = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = prepare_for_generation(GPT.from_pretrained(tiny_gpt_dir), cpu, dtype)
        cache = model.new_cache(1, 8)
        assert cache.kv.dtype == torch.float32  # attention runs in fp32 on CPU whatever the weights
        with torch.no_grad():
            model(prompt[:, :-1], cache)
            logits[dtype] = model(prompt[:, -1:], cache).float()  # a decoding step through the cache
    err = (logits[torch.bfloat16] - logits[torch.float32]).abs()
    print(f"bf16 vs fp32 decoding step: max logit error {err.max():.4f}, mean {err.mean():.4f}"
          f" (mean |logit| {logits[torch.float32].abs().mean():.3f})")
    assert err.max() <= 0.08 and err.mean() <= 0.015  # measured: 0.037 and 0.0065


def test_generation_past_block_size_slides_the_window(pair):
    ours, _ = pair
    prompt = list(range(100, 220))  # 120 of the 128 positions
    greedy = Sampler(temperature=0)
    cached = list(ours.generate(prompt, 30, greedy, use_cache=True))
    uncached = list(ours.generate(prompt, 30, greedy, use_cache=False))
    assert len(cached) == 30 and cached == uncached


def test_stops_at_end_of_text_unless_ignored(pair):
    ours, _ = pair

    class AlwaysEOT:
        def __call__(self, logits, context):
            return 50256

    assert list(ours.generate([1, 2], 10, AlwaysEOT(), eos_id=50256)) == [50256]
    assert len(list(ours.generate([1, 2], 10, AlwaysEOT(), eos_id=None))) == 10


def test_top_k_on_a_hand_made_distribution():
    values, ids = top_k_candidates(torch.tensor([1.0, 4.0, 3.0, 2.0, 0.0]), 2)
    assert ids.tolist() == [1, 2] and values.tolist() == [4.0, 3.0]
    assert top_k_candidates(torch.tensor([1.0, 4.0]), 10)[1].tolist() == [1, 0]


def test_sampling_never_leaves_the_top_k_nor_the_nucleus():
    probs = torch.tensor([0.04, 0.5, 0.3, 0.15, 0.01])
    sampler = Sampler(temperature=1.0, top_k=3, top_p=0.75, seed=0)
    drawn = {sampler(probs.log(), []) for _ in range(300)}
    assert drawn == {1, 2}  # top-3 is {1, 2, 3}; within it 0.5 + 0.3 covers 0.75 of the renormalized mass


def test_top_p_on_a_hand_made_distribution():
    probs = torch.tensor([0.05, 0.5, 0.3, 0.15])
    logits = probs.log()
    # 0.5 alone < 0.6; 0.5 + 0.3 reaches 0.6: keep those two.
    assert torch.isfinite(top_p_filter(logits, 0.6)).tolist() == [False, True, True, False]
    # exactly reaching p keeps the set that reaches it: 0.5 + 0.3 = 0.8
    assert torch.isfinite(top_p_filter(logits, 0.8)).tolist() == [False, True, True, False]
    assert torch.isfinite(top_p_filter(logits, 0.81)).tolist() == [False, True, True, True]
    assert torch.isfinite(top_p_filter(logits, 0.01)).tolist() == [False, True, False, False]


def test_filters_match_transformers_warpers():
    logits = torch.randn(1, 1000, generator=torch.Generator().manual_seed(3)) * 3
    ids = torch.tensor([[5, 17, 17, 999, 400]])
    kept_by_hf = torch.isfinite(TopKLogitsWarper(37)(ids, logits.clone())[0]).nonzero().flatten()
    assert sorted(top_k_candidates(logits[0], 37)[1].tolist()) == kept_by_hf.tolist()
    assert torch.equal(torch.isfinite(top_p_filter(logits[0], 0.9)),
                       torch.isfinite(TopPLogitsWarper(0.9)(ids, logits.clone())[0]))
    ref = RepetitionPenaltyLogitsProcessor(1.3)(ids, logits.clone())[0]
    assert torch.allclose(apply_repetition_penalty(logits[0], ids[0].tolist(), 1.3), ref)


def test_bf16_logits_draw_what_their_fp32_values_draw():
    logits = (torch.randn(2000, generator=torch.Generator().manual_seed(4)) * 3).bfloat16()
    ref = RepetitionPenaltyLogitsProcessor(1.3)(torch.tensor([[5, 17, 999]]), logits.float()[None].clone())[0]
    assert torch.equal(apply_repetition_penalty(logits, [5, 17, 999], 1.3), ref)  # fp32 arithmetic, as transformers'
    for settings in (dict(top_k=50), dict(top_p=0.9), dict(top_k=200, top_p=0.8, repetition_penalty=1.3), {}):
        draws = [[Sampler(0.7, seed=s, **settings)(x, [5, 17, 999]) for s in range(20)]
                 for x in (logits, logits.float())]
        assert draws[0] == draws[1]  # bf16 converts to fp32 exactly: the same ranking and probabilities


def test_same_seed_same_sample_different_seed_different_sample(pair):
    ours, _ = pair

    def sample(seed):
        return list(ours.generate([10, 20, 30], 30, Sampler(temperature=1.0, top_k=50, seed=seed)))

    assert sample(1) == sample(1)
    assert sample(1) != sample(2)


def test_loading_refuses_mismatched_checkpoint(tmp_path):
    folder = save_tiny_gpt2(tmp_path / "m")
    state = GPT.from_pretrained(folder).transformer.state_dict()
    model = GPT.from_random(folder)
    bad = {("transformer." + k): v for k, v in state.items() if not k.startswith("ln_f")}
    with pytest.raises(ModelError, match="missing"):
        model.load_gpt2_weights(bad, source="x")
    bad = {("transformer." + k): v for k, v in state.items()} | {"transformer.wpe.weight": torch.zeros(5, 32)}
    with pytest.raises(ModelError, match="shape"):
        model.load_gpt2_weights(bad, source="x")


@pytest.mark.parametrize("option, accepted", [
    ({"activation_function": "gelu_pytorch_tanh"}, True), ({"n_inner": 128}, True),  # the same function
    ({"activation_function": "relu"}, False), ({"scale_attn_weights": False}, False),
    ({"scale_attn_by_inverse_layer_idx": True}, False), ({"n_inner": 64}, False),
])
def test_loading_refuses_gpt2_variants_this_model_does_not_compute(tmp_path, option, accepted):
    """Each refused option changes transformers' logits (by 0.28-2.8 on the tiny model), which this model would
    not follow."""
    folder = save_tiny_gpt2(tmp_path / "m", **option)
    if accepted:
        ours, hf = GPT.from_pretrained(folder).eval(), GPT2LMHeadModel.from_pretrained(folder).eval()
        idx = torch.tensor([[464, 2068, 7586]])
        with torch.no_grad():
            assert torch.allclose(ours(idx), hf(idx).logits, atol=1e-4)
    else:
        with pytest.raises(ModelError, match=f"{next(iter(option))} .* is a GPT-2 variant this model does not"):
            GPT.from_pretrained(folder)


def test_cli_gen_on_a_local_folder(tiny_gpt_dir, tmp_path):
    result = run_cli("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "The cat sat", "--max_new_tokens", "12",
                     "--seed", "3", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("The cat sat")


def test_cli_gen_greedy_is_reproducible_and_streams_the_same_text(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "Once upon", "--max_new_tokens", "15", "--greedy",
            "--ignore_eos", "--dtype", "bfloat16")  # fixed: `auto` is measured again in each process
    streamed = run_cli(*args, cwd=tmp_path)
    printed = run_main(*args, "--no_stream", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert streamed.returncode == printed.returncode == 0
    assert streamed.stdout == printed.stdout


def test_cli_gen_hub_id_offline_is_one_clear_line(tmp_path):
    result = run_cli("gen", "--gpt_variant", "no-such-org/no-such-gpt2", "--max_new_tokens", "2", cwd=tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().count("\n") == 0 and result.stderr.startswith("error: ")
    assert "no-such-org/no-such-gpt2" in result.stderr


def test_streaming_stops_at_end_of_text_only_when_asked(tokenizer, capsys):
    from decoding.sampling import print_stream
    ids = tokenizer.encode_ordinary(" one") + [50256] + tokenizer.encode_ordinary(" two")
    print_stream(tokenizer, "Count:", iter(ids), eos_id=50256, stream=True)
    assert capsys.readouterr().out == "Count: one\n"
    print_stream(tokenizer, "Count:", iter(ids), eos_id=None, stream=False)
    assert capsys.readouterr().out == "Count: one<|endoftext|> two\n"
    print_stream(tokenizer, "", iter(tokenizer.encode_ordinary("naïve 日本")), eos_id=None, stream=True)
    assert capsys.readouterr().out == "naïve 日本\n"


# ----------------------------------------------------------------------------- batched samples, int8, dtype probe

def test_batched_sampling_equals_one_sample_at_a_time(pair):
    ours, _ = pair
    prompt = [10, 20, 30]

    def sampler(seed):
        return Sampler(temperature=1.0, top_k=50, top_p=0.95, repetition_penalty=1.2, seed=seed)

    batched = list(ours.generate_batch(prompt, 40, [sampler(7 + i) for i in range(4)]))
    columns = [[step[i] for step in batched] for i in range(4)]
    assert columns == [list(ours.generate(prompt, 40, sampler(7 + i))) for i in range(4)]
    assert len({tuple(c) for c in columns}) == 4  # different seeds, different samples


def test_batched_greedy_equals_transformers_and_slides_like_one_sample(pair):
    ours, hf = pair
    prompt = [464, 2068, 7586, 21831]
    hf.generation_config.eos_token_id = None
    reference = hf.generate(torch.tensor([prompt]), max_new_tokens=60, do_sample=False, pad_token_id=50256)
    steps = list(ours.generate_batch(prompt, 60, [Sampler(temperature=0) for _ in range(3)]))
    assert steps == [[tok] * 3 for tok in reference[0, len(prompt):].tolist()]
    long_prompt = list(range(100, 220))  # 120 of the 128 positions: the window slides
    alone = list(ours.generate(long_prompt, 30, Sampler(temperature=0), use_cache=False))
    assert list(ours.generate_batch(long_prompt, 30, [Sampler(temperature=0)] * 2)) == [[tok] * 2 for tok in alone]


def test_each_sample_stops_at_its_own_end_of_text(pair):
    ours, _ = pair

    class EOTAfter:  # yields token 5, then <|endoftext|> at step `n`
        def __init__(self, n):
            self.n, self.calls = n, 0

        def __call__(self, logits, context):
            self.calls += 1
            return 50256 if self.calls == self.n else 5

    samplers = [EOTAfter(3), EOTAfter(100), EOTAfter(6)]
    steps = list(ours.generate_batch([1, 2], 10, samplers, eos_id=50256))
    columns = [[step[i] for step in steps if step[i] is not None] for i in range(3)]
    assert columns == [[5, 5, 50256], [5] * 10, [5] * 5 + [50256]]
    assert [s.calls for s in samplers] == [3, 10, 6]  # an ended sample draws no more
    assert list(ours.generate_batch([1, 2], 10, [EOTAfter(2), EOTAfter(2)], eos_id=50256)) == [[5, 5], [50256] * 2]


def test_int8_logits_and_greedy_tokens_stay_close_to_fp32(tmp_path):
    """The README's int8 numbers: a tiny GPT-2 (n_embd 32) with 256 positions, 200 greedy tokens."""
    folder = save_tiny_gpt2(tmp_path / "m", n_positions=256)
    ref, q = GPT.from_pretrained(folder).eval(), quantize_int8(GPT.from_pretrained(folder).eval())
    assert isinstance(q.lm_head, Int8Linear) and q.lm_head.weight.dtype == torch.int8
    assert q.transformer.wte.weight.dtype == torch.float32  # the embedding keeps its float weights
    prompt = [464, 2068, 7586, 21831]
    tokens = list(ref.generate(prompt, 200, Sampler(temperature=0)))
    idx = torch.tensor([prompt + tokens[:-1]])
    with torch.no_grad():
        a, b = ref(idx)[0, len(prompt) - 1:], q(idx)[0, len(prompt) - 1:]  # (200, vocab): the logits of each token
    err = (a - b).abs()
    agreement = float((a.argmax(-1) == b.argmax(-1)).float().mean())
    print(f"int8 vs fp32: max logit error {err.max():.4f}, mean {err.mean():.4f} (mean |logit| {a.abs().mean():.3f}),"
          f" greedy agreement {agreement:.1%} over 200 tokens")
    assert err.max() <= 0.2 and err.mean() <= 0.03  # measured: 0.131 and 0.0135
    assert agreement >= 0.9  # measured: 94.0%
    with torch.no_grad():  # decoding: the prompt, then one row a step, whose activations go to int8 as well
        cache = q.new_cache(1, idx.size(1))
        steps = [q(idx[:, :len(prompt)], cache)[0, -1]] + [q(idx[:, i:i + 1], cache)[0, -1]
                                                            for i in range(len(prompt), idx.size(1))]
    err = (a - torch.stack(steps)).abs()
    agreement = float((a.argmax(-1) == torch.stack(steps).argmax(-1)).float().mean())
    print(f"int8 decoding steps vs fp32: max logit error {err.max():.4f}, mean {err.mean():.4f}, greedy agreement "
          f"{agreement:.1%}")
    assert err.max() <= 0.25 and err.mean() <= 0.03  # measured: 0.167 and 0.0159
    assert agreement >= 0.9  # measured: 94.5%


def test_int8_kernel_computes_the_dequantized_product():
    torch.manual_seed(0)
    linear = torch.nn.Linear(64, 48)
    q, x = Int8Linear(linear), torch.randn(2, 3, 64)
    expected = torch.nn.functional.linear(x, q.dequantized(torch.float32), q.bias)  # the path off CPU
    error = (q.dequantized(torch.float32) - linear.weight).abs()  # rounding (half a step) and the bf16 scale's
    assert (error <= q.scale.float()[:, None]).all()  # own rounding (127 x 2^-9 of a step): under one step
    assert torch.allclose(q(x), expected, atol=0.02)  # the kernel's activations are bf16
    assert q.dequantized(torch.float16).dtype == torch.float16


@pytest.mark.skipif(torch.backends.quantized.engine not in ("x86", "fbgemm"), reason="no FBGEMM in this torch")
def test_int8_one_row_quantizes_its_activations_and_several_rows_do_not():
    torch.manual_seed(0)
    linear, x = torch.nn.Linear(256, 96), torch.randn(3, 256)
    q = Int8Linear(linear)
    exact = torch.nn.functional.linear(x, q.dequantized(torch.float32), q.bias)  # int8 weights, float activations
    one_row = torch.cat([q(row[None]) for row in x])  # FBGEMM: 8-bit activations, each row in its own range
    rows = q(x)  # _weight_int8pack_mm: bf16 activations
    assert q.packed is not None
    step = x.abs().amax(-1, keepdim=True) * 2 / 255  # one step of a row's 8-bit grid spans its range / 255
    bound = step / 2 * q.dequantized(torch.float32).abs().sum(-1)  # half a step per input, at worst
    assert ((one_row - exact).abs() <= bound).all() and not torch.allclose(one_row, rows, atol=1e-4)
    assert torch.allclose(rows, exact, atol=0.02)


def test_int8_centered_head_keeps_logits_with_a_shared_offset_as_close_as_without():
    """A head whose rows share a component, so that logits sit near -35 and spread by about 4, as GPT-2's do:
    plain int8 rows spend their scale on the shared part; centered ones quantize what tells tokens apart."""
    torch.manual_seed(0)
    vocab, width = 4096, 256
    shared = torch.randn(width)
    head = torch.nn.Linear(width, vocab, bias=False)
    head.weight.data = torch.randn(vocab, width) * 0.15 + 0.1 * shared
    x = torch.randn(8, width) - 350 * shared / shared.norm() ** 2  # x . shared = -350 on average
    exact = x @ head.weight.T
    plain, centered = Int8Linear(head)(x).float(), Int8Linear(head, centered=True)(x).float()
    print(f"logits: mean {exact.mean():.1f}, spread {exact.std(dim=1).mean():.1f}")
    assert -45 < exact.mean() < -25 and exact.std(dim=1).mean() < 8
    plain_error, centered_error = (plain - exact).abs().mean(), (centered - exact).abs().mean()
    print(f"int8 head, mean logit {exact.mean():.1f}: mean error plain {plain_error:.4f}, centered {centered_error:.4f}")
    assert centered_error < plain_error / 2  # measured: 0.0775 and 0.0250
    off_cpu = x @ Int8Linear(head, centered=True).dequantized(torch.float32).T  # the product off the CPU
    assert (off_cpu - exact).abs().mean() < plain_error / 2


def test_cli_gen_auto_dtype_is_the_hardware_rule_with_or_without_int8(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    chosen = []
    prepare = commands.prepare_for_generation

    def recording(model, device, dtype, **kwargs):
        chosen.append(dtype)
        return prepare(model, device, dtype, **kwargs)

    monkeypatch.setattr(commands, "prepare_for_generation", recording)
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "Once upon", "--max_new_tokens", "3", "--device", "cpu")
    for extra in (["--quantize", "int8"], []):
        result = run_main(*args, *extra, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
        assert result.returncode == 0, result.stderr
    rule = torch.bfloat16 if has_fast_bf16(torch.device("cpu")) else torch.float32
    assert chosen == [rule, rule]


def test_cli_gen_with_one_seed_prints_the_same_text_in_two_processes(tiny_gpt_dir, tmp_path):
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "Once upon a time", "--max_new_tokens", "40",
            "--ignore_eos", "--num_samples", "2", "--seed", "7", "--device", "cpu", "--dtype", "auto")
    first, second = run_cli(*args, cwd=tmp_path), run_cli(*args, cwd=tmp_path)
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert first.stdout == second.stdout and first.stdout.count("Once upon a time") == 2


def test_generation_never_draws_the_rows_that_pad_a_vocabulary():
    torch.manual_seed(0)
    model = GPT(GPTConfig(n_layer=1, n_head=2, n_embd=16, block_size=32, vocab_size=50304)).eval()  # nanoGPT's
    with torch.no_grad():
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.fill_(1.0)  # every hidden state is all ones...
        model.lm_head.weight[BPE_TOKENS:] = 10.0  # ...so the padding rows would win by far
        assert model(torch.tensor([[1]]))[0, -1].argmax() >= BPE_TOKENS
    drawn = [tok for steps in model.generate_batch([1], 5, [Sampler(temperature=0), Sampler(seed=0)]) for tok in steps]
    assert all(tok < BPE_TOKENS for tok in drawn)


def test_cli_gen_random_weights_follow_the_seed(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--random_init", "--prompt", "Hi", "--greedy",
            "--max_new_tokens", "8", "--ignore_eos", "--dtype", "float32")
    texts = [run_main(*args, "--seed", seed, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd).stdout
             for seed in (3, 3, 4)]
    assert texts[0] == texts[1] != texts[2]


def test_cli_gen_samples_print_in_order_and_match_single_runs(tiny_gpt_dir, tmp_path, monkeypatch, capfd):
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "Once upon", "--max_new_tokens", "10", "--ignore_eos",
            "--dtype", "float32")
    batched = run_cli(*args, "--num_samples", "3", "--seed", "4", cwd=tmp_path)
    assert batched.returncode == 0, batched.stderr
    texts = [part.strip() for part in batched.stdout.split("===== sample ")[1:]]
    for i, text in enumerate(texts):
        alone = run_main(*args, "--seed", str(4 + i), cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
        assert text == f"{i + 1} =====\n{alone.stdout.strip()}"
    quantized = run_main(*args, "--quantize", "int8", "--greedy", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert quantized.returncode == 0 and quantized.stdout.startswith("Once upon"), quantized.stderr
