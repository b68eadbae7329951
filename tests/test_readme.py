"""Every command the README shows is true: each parses as it is written, and each runs, made cheap (tiny GPT-2s
saved under the variants' names in the working folder, a few examples, one epoch, a few tokens)."""
import os
import shlex

import pytest

from conftest import ROOT, run_main, save_tiny_gpt2
import run

CHEAP = {"gen": ["--max_new_tokens", "4"], "LoRA": ["--max_examples", "32", "--epochs", "1"],
         "rnn": ["--max_examples", "32", "--epochs", "1", "--rnn_hidden", "16"],
         "distil": ["--max_examples", "32", "--epochs", "1", "--rnn_hidden", "16"],
         "tune": ["--max_examples", "32", "--epochs", "1", "--rnn_hidden", "16", "--seeds", "1",
                  "--grid", "temperature=1,2"]}
SEARCH = ["--max_examples", "32", "--epochs", "1", "--rnn_hidden", "16", "--seeds", "1", "--trials", "1"]


def readme_commands():
    """The commands of the README's bash blocks, in order, each as its argument list."""
    commands, block = [], False
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("```"):
            block = line.strip() == "```bash"
            continue
        if block and line.strip():
            words = shlex.split(line, comments=True)
            while "&&" in words:
                commands.append(words[:words.index("&&")])
                words = words[words.index("&&") + 1:]
            commands.append(words)
    return commands


def run_py_commands():
    return [words[2:] for words in readme_commands() if words[:2] == ["python", "run.py"]]


def test_the_quickstart_is_two_commands_and_ci_runs_the_test_command():
    first, second = readme_commands()[:3], readme_commands()[2]
    assert first[0][:2] == ["pip", "install"] and first[1][:3] == ["python", "run.py", "gen"]
    assert second == ["python", "-m", "pytest", "-q", "tests"]
    assert " ".join(second) in (ROOT / ".ci" / "run").read_text()


@pytest.mark.parametrize("argv", run_py_commands(), ids=" ".join)
def test_every_command_parses_as_written(argv):
    args, rest = run.build_parser().parse_known_args(argv)
    assert rest == [] or args.mode == "tune"


def test_every_command_runs_made_cheap(tmp_path, cola_dir, monkeypatch, capfd):
    for variant in ("gpt2", "gpt2-medium", "gpt2-xl"):  # a local folder of that name is what the name loads
        save_tiny_gpt2(tmp_path / variant)
    (tmp_path / "data").mkdir()
    os.symlink(cola_dir, tmp_path / "data" / "cola")
    (tmp_path / "notes.txt").write_text("To be, or not to be, that is the question.\n" * 40)
    e2e = tmp_path / "e2e"  # what the README's python -c line writes
    e2e.mkdir()
    for split in ("train", "validation", "test"):
        (e2e / f"{split}.csv").write_text("meaning_representation,human_reference\n"
                                          '"name[The Vaults], eatType[pub]",The Vaults is a pub.\n' * 4)
    for argv in run_py_commands():
        cheap = argv + ([] if "--epochs" in argv and argv[argv.index("--epochs") + 1] == "0"
                        else SEARCH if "--search" in argv else CHEAP.get(argv[0], []))
        result = run_main(*cheap, cwd=tmp_path, monkeypatch=monkeypatch, capfd=capfd)
        assert result.returncode == 0, f"{' '.join(cheap)}: {result.stderr}"
