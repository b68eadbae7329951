"""The checks each subcommand's flags pass before anything is downloaded or built: a flag out of range for its
purpose, a missing input, an output that would overwrite something else, end in one line (`parser.error`, exit 2)."""
import importlib.util
import os
from pathlib import Path

from cli import optuna_search as search
from training.checkpoints import ADAPTER_CONFIG, LM_TASK, adapter_base, adapter_task, folder_holds
from textdata.readers import DataSpec, cola_missing
from model import load_config, looks_like_path
from training.report import PLOTS_DIR
from training.runlog import TUNING_DIR, resume_state_path
from utils import UserError, writable


def check_gen(parser, args):
    ignored = [flag for flag in ("temperature", "top_p") if args.greedy and getattr(args, flag) is not None]
    if ignored:
        parser.error(f"--greedy takes the most likely token: --{ignored[0]} would be ignored")
    check_beams(parser, args)
    eager_only = [flag for flag, off in (("num_beams", 1), ("no_repeat_ngram_size", 0)) if getattr(args, flag) > off]
    if args.compile and eager_only:
        parser.error(f"--compile compiles the sampling step, which has no --{eager_only[0]}: drop one of the two")
    check_variant(parser, args.gpt_variant)
    check_adapter_task(parser, "adapter", args.adapter, LM_TASK)
    if args.adapter and args.random_init:
        parser.error("--adapter builds its base as the adapter's run recorded it: --random_init would be ignored")
    check_gen_dataset(parser, args)
    check_exists(parser, "prompt_file", args.prompt_file)
    if args.prompt_file:
        try:
            Path(args.prompt_file).read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            parser.error(f"--prompt_file {args.prompt_file}: not UTF-8 text (byte {e.start})")


def check_gen_dataset(parser, args):
    """--dataset decodes the split's prompts, one output each, scored against prompt -> completion pairs."""
    data_only = [flag for flag in ("dataset_config", "eval_split", "prompt_column", "completion_column")
                 if getattr(args, flag) is not None]
    if not args.dataset:
        if data_only:
            parser.error(f"--{data_only[0]} is for --dataset (generation as evaluation): give --dataset too")
        return
    pair = [flag for flag in ("prompt_column", "completion_column") if getattr(args, flag) is None]
    if pair:
        parser.error(f"--dataset decodes prompt -> completion pairs: give --{pair[0]} too")
    ignored = [flag for flag, off in (("prompt", None), ("prompt_file", None), ("num_samples", 1), ("compile", False),
                                      ("no_stream", False)) if getattr(args, flag) != off]
    if ignored:
        parser.error(f"--dataset decodes every prompt of its evaluation split, one output each: --{ignored[0]} "
                     "would be ignored")
    wrong = DataSpec.from_args(args).ignored_flag()
    if wrong:
        parser.error(wrong)
    check_results_writable(parser, args)


def check_beams(parser, args):
    """Beam flags need beams; beams pick the most likely hypotheses, one output, so no sampling flag applies."""
    beam_only = [flag for flag in ("length_penalty", "early_stopping") if getattr(args, flag) is not None]
    if args.num_beams == 1 and beam_only:
        parser.error(f"--{beam_only[0]} is a beam-search setting: give --num_beams 2 or more")
    sampling = [flag for flag in ("temperature", "top_p") if getattr(args, flag) is not None]
    if args.num_beams > 1 and (sampling or args.num_samples > 1):
        flag = f"--{sampling[0]}" if sampling else "--num_samples"
        parser.error(f"--num_beams {args.num_beams} returns the most likely hypothesis: {flag} would be ignored")


def check_lora(parser, args):
    twice = next((t for i, t in enumerate(args.lora_targets) if t in args.lora_targets[:i]), None)
    if twice:
        parser.error(f"--lora_targets: {twice} is given twice")
    check_variant(parser, args.gpt_variant)
    check_task(parser, args)
    check_training(parser, args, "model_path")


LM_ONLY, CLASSIFY_ONLY = ("block_size", "prompt_column", "completion_column", "generate_eval"), ("label_column",)


def check_task(parser, args):
    """Each task's own flags; a language model reads text from --dataset (CoLA is labelled sentences), pairs need
    both columns, and a block fits in the model's context."""
    other = CLASSIFY_ONLY if args.task == "lm" else LM_ONLY
    given = next((flag for flag in other if getattr(args, flag) not in (None, 0)), None)
    if given:
        needs = "--task classify (labels)" if args.task == "lm" else "--task lm"
        parser.error(f"--{given} is for {needs}: it does not apply to --task {args.task}")
    if args.task != "lm":
        return
    if args.dataset == "cola" and args.epochs:
        parser.error("--task lm trains on text: give --dataset (a .txt file or folder, a folder of data files, or a "
                     "hub id) with a text column, or --prompt_column and --completion_column")
    if bool(args.prompt_column) != bool(args.completion_column):
        parser.error(f"--{'prompt' if args.completion_column else 'completion'}_column is needed too: pairs have a "
                     "prompt and a completion")
    if args.generate_eval and not args.prompt_column:
        parser.error("--generate_eval decodes prompts: it needs prompt -> completion pairs (--prompt_column and "
                     "--completion_column)")
    if args.block_size and args.block_size > (context := load_config(args.gpt_variant).block_size):
        parser.error(f"--block_size {args.block_size}: over {args.gpt_variant}'s context of {context} tokens")


def check_distil(parser, args):
    check_variant(parser, args.gpt_variant)
    check_training(parser, args, "student_path")
    if args.transfer_gen and (Path(args.model_path) / ADAPTER_CONFIG).exists():
        check_generator(parser, args)


def check_generator(parser, args):
    """--transfer_gen samples from the teacher's base: it must be loadable with its pretrained weights."""
    try:
        _, info, base = adapter_base(args.model_path, args.gpt_variant)
    except UserError:  # a broken adapter: distil itself says what is wrong
        return
    why = None
    if info.get("random_init"):
        why = "has random weights (its LoRA run used --random_init), so its samples are no sentences"
    elif os.path.isdir(base) and not list(Path(base).glob("*.safetensors")):
        why = "holds no weights (*.safetensors)"
    elif looks_like_path(base) and not os.path.isdir(base):
        why = "is no such folder"
    elif not os.path.isdir(base) and os.environ.get("HF_HUB_OFFLINE") and not hub_cached(base):
        why = "is not in the Hugging Face cache, and HF_HUB_OFFLINE is set"
    if why:
        parser.error(f"--transfer_gen: the teacher's base {base} cannot be loaded to sample from: it {why}")


def hub_cached(name):
    from huggingface_hub import try_to_load_from_cache
    return isinstance(try_to_load_from_cache(name, "config.json"), str)


def check_model_use(parser, args):
    """predict and export read a trained model's folder; predict may read an --input file, export writes --out."""
    check_variant(parser, args.gpt_variant)
    check_exists(parser, "input", getattr(args, "input", None))
    check_exists(parser, "model_path", args.model_path, folder=True)
    if args.mode == "predict":
        check_adapter_task(parser, "model_path", args.model_path, "SEQ_CLS")
    if args.mode == "export":
        check_output_folder(parser, "out", args.out)
        check_output_kind(parser, "out", args.out, "a transformers model")


def check_adapter_task(parser, flag, folder, task):
    """--flag FOLDER, when given and an adapter, must be of PEFT's `task` type: gen decodes with a CAUSAL_LM
    adapter, predict classifies with a SEQ_CLS one."""
    if not folder:
        return
    check_exists(parser, flag, folder, folder=True)
    if not (Path(folder) / ADAPTER_CONFIG).is_file() and task == LM_TASK:
        parser.error(f"--{flag} {folder}: no {ADAPTER_CONFIG}, not a LoRA adapter folder")
    if (Path(folder) / ADAPTER_CONFIG).is_file() and (adapter_task(folder) == LM_TASK) != (task == LM_TASK):
        if task == LM_TASK:
            parser.error(f"--{flag} {folder}: a classification adapter; gen decodes with a language-model "
                         f"(CAUSAL_LM) adapter (classify with `python run.py predict --model_path {folder}`)")
        parser.error(f"--{flag} {folder}: a language-model (CAUSAL_LM) adapter; predict classifies (decode with "
                     f"`python run.py gen --adapter {folder}`)")


def check_variant(parser, variant):
    if variant and looks_like_path(variant):  # else a Hugging Face id, looked up when it is loaded
        check_exists(parser, "gpt_variant", variant, folder=True)


def check_exists(parser, flag, path, folder=False):
    """--flag PATH, when given, must name an existing folder (or file)."""
    if path and not (Path(path).is_dir() if folder else Path(path).is_file()):
        parser.error(f"--{flag} {path}: no such {'folder' if folder else 'file'}")


def check_output_folder(parser, flag, path):
    """A folder we write into: it may exist and hold other files, but must not be a file."""
    if Path(path).exists() and not Path(path).is_dir():
        parser.error(f"--{flag} {path}: exists and is not a folder (nothing was written to it)")
    if not writable(path):
        parser.error(f"--{flag} {path}: cannot write there (a file is in the way, or no permission)")


def check_output_kind(parser, flag, path, writes):
    """An output folder may hold an earlier model of the kind written there, never another model's files (a
    teacher's adapter, a base model), which the write would overwrite or mix with."""
    held = folder_holds(path)
    if held and held != writes:
        parser.error(f"--{flag} {path}: holds {held}; {writes} written there would overwrite or mix with it, "
                     "choose another folder")


def check_training(parser, args, output_flag):
    out = getattr(args, output_flag)
    check_output_folder(parser, output_flag, out)
    if args.dataset == "cola" and cola_missing(args.data_dir):  # a read-only folder holding the files is fine
        check_output_folder(parser, "data_dir", args.data_dir)
    state = resume_state_path(out)  # beside the output folder, not in it
    if not writable(state):
        parser.error(f"--{output_flag} {out}: cannot write {state} (a run's state between epochs) there")
    check_output_kind(parser, output_flag, out, "a LoRA adapter" if args.mode == "LoRA" else "a student checkpoint")
    ignored = DataSpec.from_args(args).ignored_flag()
    if ignored:
        parser.error(ignored)
    check_tensorboard(parser, args)
    check_results_writable(parser, args)


def check_tensorboard(parser, args):
    if args.tensorboard and importlib.util.find_spec("tensorboard") is None:
        parser.error("--tensorboard needs the tensorboard package: pip install tensorboard")
    if args.tensorboard not in (None, "auto"):
        check_output_folder(parser, "tensorboard", args.tensorboard)


def check_tune(parser, args):
    """--grid belongs to the grid, --space and the study's flags to --search optuna (which needs the optuna
    package); the search's defaults are filled in here."""
    check_results_writable(parser, args)
    searching = ("space", "storage", *search.DEFAULTS)
    if args.search == "grid":
        given = next((flag for flag in searching if getattr(args, flag)), None)
        if given:
            parser.error(f"--{given} is for --search optuna (the grid runs every configuration of --grid)")
        return
    if importlib.util.find_spec("optuna") is None:
        parser.error("--search optuna needs the optuna package: pip install optuna")
    if args.grid:
        parser.error("--grid is for --search grid; --search optuna draws configurations from --space")
    if not args.space:
        parser.error("--search optuna needs --space, e.g. --space lr=log:1e-4:3e-3")
    if os.environ.get("WORLD_SIZE", "1") != "1":
        parser.error("--search optuna runs its trials one process each: start workers side by side (--parallel) "
                     "or as separate jobs, not under torchrun")
    for flag, default in search.DEFAULTS.items():
        if getattr(args, flag) is None:
            setattr(args, flag, default)


def check_results_writable(parser, args):
    for folder in (TUNING_DIR, PLOTS_DIR):
        if Path(folder).exists() and not Path(folder).is_dir():
            parser.error(f"{folder}: a file is where run results go (the folder {folder}/); move it away")
        if not writable(folder):
            parser.error(f"{folder}/: cannot write run results there (permission denied)")
