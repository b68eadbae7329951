"""bench.py's ct2 rows: the tokenizer folder the converter reads, the same model on both sides, the timing process."""
import pytest
from transformers import GPT2Config, GPT2TokenizerFast

from conftest import TINY
from benchmarks.engine_timing import converted, prompt_ids, step_bytes, timed_in_own_process
from decoding.sampling import Sampler
from model import GPT
from textdata.readers import get_tokenizer
from textdata.tokenizer_files import write_gpt2_tokenizer


def test_the_tokenizer_folder_encodes_as_tiktoken(tmp_path):
    write_gpt2_tokenizer(tmp_path)
    text = "Hello, I'm a language model, naïvely tokenized:  twice!\n<|endoftext|>"
    assert GPT2TokenizerFast.from_pretrained(tmp_path).encode(text) == get_tokenizer().encode(
        text, allowed_special={"<|endoftext|>"})


def test_ctranslate2_decodes_our_tokens_from_the_converted_model_and_a_process_times_ours():
    ctranslate2 = pytest.importorskip("ctranslate2")
    folder = converted(GPT2Config(**TINY))
    ours = GPT.from_pretrained(folder / "hf").eval()
    prompt = prompt_ids(12)
    expected = list(ours.generate(prompt, 20, Sampler(temperature=0)))
    theirs = ctranslate2.Generator(str(folder / "float32")).generate_batch(
        [[GPT2TokenizerFast.from_pretrained(folder / "hf").convert_ids_to_tokens(i) for i in prompt]], max_length=20,
        min_length=20, include_prompt_in_result=False)[0].sequences_ids[0]
    assert theirs == expected  # greedy: the same weights on both sides
    timed = timed_in_own_process("ours", folder / "hf", "--new_tokens", "3", "--dtype", "float32")
    assert timed["seconds"] > 0 and timed["step_bytes"] == step_bytes(ours) == 4 * sum(
        p.numel() for p in ours.parameters())
