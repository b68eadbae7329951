"""The typed configuration: the command line made from its fields lists the flags and defaults it always had, no
function below the command line takes a Namespace, a record written before the configuration was typed is read
by the one reader, and the root holds only what the brief names."""
import ast
from dataclasses import replace
import json

import pytest

from cli.parser import build_parser, command_line, config_of
from config.fields import flat_values, plain
from conftest import ROOT
from textdata.readers import default_cola_dir

SNAPSHOT = json.loads((ROOT / "tests" / "fixtures" / "command_line_before.json").read_text())


def flag_entry(flags, default, choices=None, nargs=None):
    return {"flags": flags, "default": default, "choices": choices, "nargs": nargs}


# Flags added since the snapshot, each on purpose, as the snapshot writes a flag (a subcommand added since: all its
# flags).
ADDED = {"gen": {"no_record": flag_entry(["--no_record"], False, nargs=0)},
         "report": {"debug": flag_entry(["--debug"], False, nargs=0), "runs": flag_entry(["--runs"], "."),
                    "out": flag_entry(["--out"], "report"),
                    "select": flag_entry(["--select"], "latest", choices=["latest", "best"]),
                    "run_id": flag_entry(["--run", "--run_id"], None)},
         "LoRA": {"method": flag_entry(["--method"], "lora", choices=["lora", "head", "full"]),
                  "use_rslora": flag_entry(["--use_rslora"], False, nargs=0),
                  "use_dora": flag_entry(["--use_dora"], False, nargs=0),
                  "grad_checkpoint": flag_entry(["--grad_checkpoint"], False, nargs=0)}}
BEFORE = {mode: SNAPSHOT.get(mode, {}) | ADDED.get(mode, {}) for mode in {*SNAPSHOT, *ADDED}}
MINIMAL = {"gen": [], "LoRA": [], "rnn": [], "distil": [], "predict": ["--model_path", "M"],
           "export": ["--model_path", "M", "--out", "O"], "tune": ["rnn"], "info": [], "report": []}
# Flags whose parsed value was None, where the code then used the value the configuration now holds itself.
RESOLVED_LATER = {("LoRA", "train_split"): "train", ("rnn", "train_split"): "train", ("distil", "train_split"): "train",
                  ("predict", "train_split"): "train"}
# Flags that now default to None (not given) because they apply only with another flag, which fills in the old
# default where it applies: --top_k (sampling, not --greedy or beams), the --augment rates.
GIVEN_OR_NONE = {("gen", "top_k"): None, **{("distil", f): None for f in ("p_mask", "p_replace", "p_ngram")}}


def subparsers():
    parser = build_parser()
    return parser, next(a for a in parser._actions if a.dest == "mode").choices


@pytest.mark.parametrize("mode", sorted(MINIMAL))
def test_each_subcommand_lists_the_flags_and_defaults_it_had(mode):
    parser, sub = subparsers()
    flags = {a.dest: a for a in sub[mode]._actions if a.option_strings and a.dest != "help"}
    assert {dest: sorted(a.option_strings) for dest, a in flags.items()} == {
        dest: before["flags"] for dest, before in BEFORE[mode].items()}
    assert {dest: (a.choices and list(a.choices), a.nargs) for dest, a in flags.items()} == {
        dest: (before["choices"], before["nargs"]) for dest, before in BEFORE[mode].items()}
    values = flat_values(config_of(parser.parse_args([mode, *MINIMAL[mode]])))
    now = {dest: "<default_cola_dir>" if dest == "data_dir" and values[dest] == default_cola_dir() else values[dest]
           for dest in flags}
    expected = {dest: (RESOLVED_LATER | GIVEN_OR_NONE).get((mode, dest), before["default"])
                for dest, before in BEFORE[mode].items()}
    assert plain(now) == expected


@pytest.mark.parametrize("argv", [["LoRA", "--LoRA_rank", "8", "--task", "lm", "--dataset", "notes.txt"],
                                  ["rnn", "--hidden_dim", "16", "--gpu_id", "1", "--lr", "0.01"],
                                  ["distil", "12345", "--augment", "2", "--kd_loss", "mse"],
                                  ["gen", "--num_beams", "3", "--early_stopping", "--prompt", "Hi"],
                                  ["tune", "rnn", "--search", "optuna", "--space", "lr=log:1e-4:1e-2", "--seeds", "1"],
                                  ["predict", "--model_path", "M", "--sentence", "a", "--sentence", "b"]])
def test_a_configuration_gives_back_its_command_line(argv):
    parser = build_parser()
    config = config_of(parser.parse_args(argv))
    assert config_of(parser.parse_args(command_line(config))) == config


def test_derived_defaults_follow_their_flag_and_the_assignment_aliases_work():
    parser = build_parser()
    lm = config_of(parser.parse_args(["LoRA", "--LoRA_rank", "8", "--task", "lm", "--gpt_variant", "gpt2-medium"]))
    assert (lm.lora.lora_alpha, lm.train.batch_size, lm.train.lr, lm.model_path) == (8, 8, 2e-4,
                                                                                      "models/LoRA-gpt2-medium-lm")
    rnn = config_of(parser.parse_args(["rnn", "777", "--gpu_id", "1", "--hidden_dim", "16"]))
    assert (rnn.run.seed, rnn.run.device, rnn.student.rnn_hidden) == (777, "cuda:1", 16)
    assert config_of(parser.parse_args(["LoRA", "--lora_rank", "2"])).lora.LoRA_rank == 2


def test_a_configuration_is_never_changed_once_made():
    config = config_of(build_parser().parse_args(["rnn"]))
    with pytest.raises(AttributeError):
        config.train.lr = 1.0
    assert replace(config.train, lr=1.0).lr == 1.0 and config.train.lr == 1e-3


COMMAND_TIER = ("run.py", "cli/")


def functions_taking_a_namespace(path):
    """The functions of a file with a parameter named `args` or annotated as a Namespace."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            for arg in a.posonlyargs + a.args + a.kwonlyargs:
                note = ast.unparse(arg.annotation) if arg.annotation else ""
                if arg.arg == "args" or "Namespace" in note:
                    found.append(f"{path.relative_to(ROOT)}:{node.lineno} {node.name}")
    return found


def test_no_function_below_the_command_line_takes_a_namespace():
    files = [p for p in ROOT.rglob("*.py") if "tests" not in p.relative_to(ROOT).parts
             and not str(p.relative_to(ROOT)).startswith(COMMAND_TIER) and ".git" not in p.parts]
    assert files and [f for p in files for f in functions_taking_a_namespace(p)] == []


ROOT_FILES = {"model.py", "run.py", "train_utils.py", "utils.py", "bench.py", "README.md", "requirements.txt",
              ".gitignore"}
ROOT_FOLDERS = {"plots", "tuning", "tests", "docs", ".ci", "cli", "config", "decoding", "textdata", "training",
                "reporting", "runtime", "benchmarks"}


def test_the_root_holds_only_what_the_brief_names():
    import subprocess
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    if not tracked:
        pytest.skip("not a git checkout")
    top = {name.split("/")[0] for name in tracked}
    assert {n for n in top if "/" not in n and (ROOT / n).is_file()} <= ROOT_FILES
    assert {n for n in top if (ROOT / n).is_dir()} <= ROOT_FOLDERS


def test_no_folder_or_module_shadows_a_library():
    import sys
    names = {p.stem for p in ROOT.rglob("*.py") if "tests" not in p.parts} | {p.name for p in ROOT.iterdir()
                                                                               if p.is_dir()}
    taken = set(sys.stdlib_module_names) | {"datasets", "transformers", "torch", "peft", "optuna", "tiktoken",
                                            "safetensors", "numpy", "scipy", "sklearn", "tqdm", "matplotlib",
                                            "tensorboard", "sacrebleu", "huggingface_hub", "data", "models"}
    assert names & taken <= {"__init__"}


def test_tests_import_no_test_module():
    tests = {p.stem for p in (ROOT / "tests").glob("test_*.py")}
    imported = {node.module for p in (ROOT / "tests").glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
                if isinstance(node, ast.ImportFrom) and node.module} | {
        alias.name for p in (ROOT / "tests").glob("*.py") for node in ast.walk(ast.parse(p.read_text()))
        if isinstance(node, ast.Import) for alias in node.names}
    assert imported & tests == set()
