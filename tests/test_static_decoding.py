"""The static decode step (static_decoding.py): the same tokens as the cached step and transformers, the same draws
as Sampler, and compiled (gen --compile) the same tokens from one graph for prompts of different lengths."""
import pytest
import torch
import torch.nn.functional as F
from transformers import GPT2LMHeadModel
from transformers.generation.logits_process import TopKLogitsWarper, TopPLogitsWarper

from conftest import run_main
from decoding.sampling import Sampler, apply_repetition_penalty, draw, penalize_seen
from decoding.static_step import StaticDecoder, cache_size
from model import GPT

PROMPTS = [[464], [464, 2068, 7586, 21831], list(range(300, 317)), list(range(1000, 1040))]


@pytest.fixture(scope="module")
def pair(tiny_gpt_dir):
    hf = GPT2LMHeadModel.from_pretrained(tiny_gpt_dir).eval()
    hf.generation_config.eos_token_id = None
    return GPT.from_pretrained(tiny_gpt_dir).eval(), hf


@pytest.fixture(scope="module")
def inductor():
    """Skip (in one line, with the reason) where inductor cannot build C++ code on this machine."""
    try:
        torch.compile(lambda x: x * 2 + 1, fullgraph=True)(torch.ones(3))
    except Exception as e:  # no compiler, no headers, an unsupported platform: whatever inductor raises
        pytest.skip(f"inductor cannot compile here: {type(e).__name__}: {str(e).splitlines()[0][:120]}")


def test_static_step_equals_the_cached_step_and_transformers(pair):
    ours, hf = pair
    static = StaticDecoder(ours, compile=False)
    for prompt in PROMPTS:
        reference = hf.generate(torch.tensor([prompt]), max_new_tokens=30, do_sample=False, pad_token_id=50256)
        expected = reference[0, len(prompt):].tolist()
        assert list(ours.generate(prompt, 30, Sampler(temperature=0))) == expected
        assert list(static.generate_batch(prompt, 30, [Sampler(temperature=0)] * 2)) == [[t, t] for t in expected]


def test_static_sampling_draws_what_generate_batch_draws_and_slides_the_window(pair):
    ours, _ = pair
    static = StaticDecoder(ours, compile=False)

    def samplers():
        return [Sampler(0.8, top_k=20, top_p=0.9, repetition_penalty=1.3, seed=5 + i) for i in range(3)]

    for prompt in PROMPTS[1:3]:
        assert list(static.generate_batch(prompt, 25, samplers())) == list(ours.generate_batch(prompt, 25,
                                                                                               samplers()))
    near_the_end = list(range(200, 200 + ours.config.block_size - 4))  # the window slides after 4 steps
    assert (list(static.generate_batch(near_the_end, 10, [Sampler(temperature=0)] * 2))
            == list(ours.generate_batch(near_the_end, 10, [Sampler(temperature=0)] * 2)))
    with pytest.raises(ValueError, match="same sampling settings"):
        next(static.generate_batch([1, 2], 3, [Sampler(0.0), Sampler(1.0)]))


def test_draw_follows_the_distribution_transformers_warpers_give():
    logits = torch.randn(1, 300, generator=torch.Generator().manual_seed(3)) * 3
    for top_k, top_p in ((None, None), (40, None), (None, 0.8), (40, 0.8)):
        warped = logits / 0.7
        if top_k:
            warped = TopKLogitsWarper(top_k)(None, warped)
        if top_p:
            warped = TopPLogitsWarper(top_p)(None, warped)
        expected = F.softmax(warped[0], dim=-1)
        grid = (torch.arange(20000) + 0.5) / 20000  # evenly spaced uniforms: frequencies are the probabilities
        picks = draw(logits.expand(len(grid), -1), grid, 0.7, top_k, top_p)
        frequencies = torch.bincount(picks, minlength=300) / len(grid)
        assert (frequencies - expected).abs().max() < 2e-4
        assert draw(logits[0], grid[123], 0.7, top_k, top_p) == picks[123]  # one row alone draws the same


def test_penalize_seen_is_the_repetition_penalty():
    logits = torch.randn(2, 50, generator=torch.Generator().manual_seed(4))
    contexts = [[3, 7, 7, 40], [0, 49]]
    seen = torch.zeros(2, 50, dtype=torch.bool)
    for row, context in enumerate(contexts):
        seen[row, context] = True
    for row, context in enumerate(contexts):
        assert torch.equal(penalize_seen(logits, seen, 1.4)[row], apply_repetition_penalty(logits[row], context, 1.4))


def test_compiled_step_gives_the_eager_tokens_from_one_graph(pair, inductor, tiny_gpt_dir, tmp_path, monkeypatch,
                                                             capfd):
    from torch._dynamo.utils import counters
    ours, _ = pair
    torch._dynamo.reset()
    counters.clear()
    compiled = StaticDecoder(ours, compile=True)
    prompts = [PROMPTS[0], PROMPTS[1], PROMPTS[2]]
    assert len({cache_size(len(p) + 12, ours.config.block_size) for p in prompts}) == 1  # one cache shape
    for prompt in prompts:
        expected = list(ours.generate(prompt, 12, Sampler(temperature=0)))
        assert [step[0] for step in compiled.generate_batch(prompt, 12, [Sampler(temperature=0)])] == expected
    assert counters["stats"]["unique_graphs"] == 1 and not counters["graph_break"]
    args = ("gen", "--gpt_variant", tiny_gpt_dir, "--prompt", "Once upon", "--max_new_tokens", "12", "--greedy",
            "--ignore_eos", "--dtype", "float32", "--no_stream")
    eager = run_main(*args, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    with_compile = run_main(*args, "--compile", cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
    assert eager.returncode == with_compile.returncode == 0
    assert with_compile.stdout == eager.stdout
