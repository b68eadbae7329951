"""GPT-2's tokenizer as a Hugging Face tokenizer folder (vocab.json, merges.txt), for tools that read one, such as
CTranslate2's converter. They are the two files tiktoken builds its gpt2 encoding from, read from tiktoken's
cache: nothing is downloaded where the cache holds them."""
from pathlib import Path

GPT2_FILES = {"vocab.json": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/encoder.json",
              "merges.txt": "https://openaipublic.blob.core.windows.net/gpt-2/encodings/main/vocab.bpe"}


def write_gpt2_tokenizer(folder):
    """Write GPT-2's vocab.json and merges.txt into `folder` (which exists)."""
    from tiktoken.load import read_file_cached
    for name, url in GPT2_FILES.items():
        (Path(folder) / name).write_bytes(read_file_cached(url))
