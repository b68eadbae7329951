"""Command line: `python run.py {gen,LoRA,rnn,distil,predict,export,tune,info} ...`. Parse, check, call."""
import argparse
import os
import sys
import traceback

from cli import optuna_search as search
from cli import grid_sweep as tune
from cli.checks import check_distil, check_gen, check_lora, check_model_use, check_training, check_tune
from cli.commands import cmd_distil, cmd_export, cmd_gen, cmd_info, cmd_lora, cmd_predict, cmd_rnn
from textdata.readers import default_cola_dir
from runtime.devices import compute_dtype, resolve_device
from runtime.distributed import init_distributed, is_main
from model import LORA_TARGETS, ModelError, variant_slug
from utils import (Terminated, UserError, fraction, interrupt_exit_code, non_negative_float, non_negative_int,
                   number_in, positive_float, positive_int, seed_int, sigterm_as_interrupt)


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """--help shows every option's default, so nobody has to open the code to learn it; an option without a fixed
    default (None) says in its help what it falls back to."""

    def _get_help_string(self, action):
        if action.default is None or action.default is False:
            return action.help
        return super()._get_help_string(action)


class OneLineParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr (exit 2), pointing at --help instead of the usage."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs | {"allow_abbrev": False,  # --seed must never be read as --seeds
                                            "formatter_class": DefaultsHelpFormatter})

    def error(self, message):
        self.exit(2, f"error: {message} (see `{self.prog} --help`)\n")


class CommandLine(OneLineParser):
    """The whole command line (its subcommands are OneLineParsers): the assignment's form is read as ours, and the
    defaults that follow other flags are filled in as soon as it is parsed."""

    def parse_known_args(self, args=None, namespace=None):
        args, rest = super().parse_known_args(assignment_argv(sys.argv[1:] if args is None else args), namespace)
        for flag, default in DERIVED_DEFAULTS.get(args.mode, {}).items():
            if getattr(args, flag) is None:
                setattr(args, flag, default(args))
        return args, rest


def assignment_argv(argv):
    """The assignment's command line in our flags: `run.py MODE SR_NO ...` (its 5-digit SR number, right after the
    subcommand, was the seed), `--gpu_id N` (--device cuda:N) and `--hidden_dim` (--rnn_hidden). Its --LoRA_rank
    and --model_path are flags of ours as they are."""
    argv = list(argv)
    if len(argv) > 1 and argv[0] != "tune" and argv[1].isdigit():
        argv[1:2] = ["--seed", argv[1]]
    out = []
    for i, arg in enumerate(argv):
        name, eq, value = arg.partition("=")
        if name == "--gpu_id" and (eq or i + 1 < len(argv)):
            out += ["--device", "cuda:"] if not eq else [f"--device=cuda:{value}"]
        elif out[-1:] == ["cuda:"]:
            out[-1] += arg
        else:
            out.append("--rnn_hidden" + eq + value if name == "--hidden_dim" else arg)
    return out


GEN_PROMPT = "Hello, I'm a language model,"

# Defaults that follow another flag, per subcommand, filled in as soon as the command line is parsed (each flag's
# help says what it follows).
DERIVED_DEFAULTS = {
    "LoRA": {"lora_alpha": lambda args: args.LoRA_rank,
             "model_path": lambda args: f"models/LoRA-{variant_slug(args.gpt_variant)}"
                                        + ("-lm" if args.task == "lm" else ""),
             "batch_size": lambda args: 8 if args.task == "lm" else 128,
             "lr": lambda args: 2e-4 if args.task == "lm" else 1e-3},
    "rnn": {"batch_size": lambda args: 128, "lr": lambda args: 1e-3},
    "gen": {"gpt_variant": lambda args: None if args.adapter else "gpt2",  # with an adapter: the base it names
            "prompt": lambda args: None if args.prompt_file or args.dataset else GEN_PROMPT},
    "distil": {"model_path": lambda args: f"models/LoRA-{variant_slug(args.gpt_variant or 'gpt2')}",
               "batch_size": lambda args: 128, "lr": lambda args: 1e-3},
}


def build_parser():
    """The command line: one subparser per subcommand, each with the flag groups it uses (see flag_groups)."""
    parser = CommandLine(description="GPT-2 generation, LoRA fine-tuning and distillation on CoLA.")
    sub = parser.add_subparsers(dest="mode", required=True, parser_class=OneLineParser)
    groups = flag_groups()
    for add in (add_gen, add_lora, add_students, add_model_use):
        add(sub, groups)
    add_tune(sub)
    sub.add_parser("info", parents=[groups.placed], help="versions, hardware, what would be chosen here, where data is"
                   ).set_defaults(func=cmd_info, check=lambda parser, args: None, dtype="auto")
    return parser


def flag_groups():
    """The flag groups subcommands share, as argparse parents."""
    # Each subcommand takes only the flags it uses: `common` every one, `placed` those that use a device,
    # `compute` those that run a model there, `seeded` those that draw random numbers.
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show full tracebacks")
    placed = argparse.ArgumentParser(add_help=False, parents=[common])
    placed.add_argument("--device", default="auto", help="auto (CUDA, else an Apple GPU, else the CPU), cpu, cuda, "
                        "cuda:N, mps")
    compute = argparse.ArgumentParser(add_help=False, parents=[placed])
    compute.add_argument("--dtype", default="auto", choices=["auto", "float32", "bfloat16", "float16"],
                         help="auto: bf16 where it is native (GPUs from A100 on, CPUs with AMX/AVX512-BF16), fp16 "
                         "on T4/V100, else fp32 (MPS: fp16, fp32 to train)")
    compute.add_argument("--compile", action="store_true",
                         help="torch.compile the model (gen: one graph per decode step, CUDA graphs on a GPU)")
    seeded = argparse.ArgumentParser(add_help=False, parents=[compute])
    seeded.add_argument("--seed", type=seed_int, default=0, help="seeds weights, data order, dropout and sampling "
                        "(the assignment's form, a number right after the subcommand, means the same)")

    gpt = argparse.ArgumentParser(add_help=False)
    gpt.add_argument("--gpt_variant", default="gpt2", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, any Hugging "
                     "Face GPT-2 id, or a local folder in transformers' format")
    gpt.add_argument("--random_init", action="store_true", help="the variant's architecture with random weights")

    groups = argparse.Namespace(common=common, placed=placed, compute=compute, seeded=seeded, gpt=gpt)
    training_flags(groups)
    return groups


def training_flags(groups):
    """The groups of the training subcommands: `train` (the loop's flags), `data` (which dataset), `student`."""
    train = argparse.ArgumentParser(add_help=False)
    train.add_argument("--data_dir", default=default_cola_dir(), help="folder of the raw CoLA TSVs "
                       "(downloaded there when missing; $COLA_DATA_DIR when set, else data/cola)")
    train.add_argument("--max_examples", type=positive_int, help="train on a seeded random subset of this size")
    train.add_argument("--resume", action="store_true", help="continue the interrupted run with these flags")
    train.add_argument("--batch_size", type=positive_int, help="sentences (or text blocks) per optimizer step "
                       "(default: 128; LoRA --task lm: 8)")
    train.add_argument("--lr", type=positive_float, help="Adam learning rate (default: 1e-3; LoRA --task lm: 2e-4)")
    train.add_argument("--tensorboard", nargs="?", const="auto", metavar="DIR", help="log steps and epochs for "
                       "TensorBoard in DIR (given alone: runs/<mode>-<time>-<pid>)")
    train.add_argument("--micro_batch_tokens", type=positive_int, help="split each batch into pieces of at most "
                       "this many padded tokens and accumulate gradients: bounds memory, same result (default: 512 "
                       "on CPU, as fast as larger pieces there; on CUDA what half the free memory holds)")

    data = argparse.ArgumentParser(add_help=False)
    data.add_argument("--dataset", default="cola", help="cola (raw TSVs in --data_dir), a Hugging Face dataset id, "
                      "or a folder: train/validation[/test] csv, tsv, json, jsonl, parquet, or save_to_disk's")
    for flag, about in (("dataset_config", "the hub dataset's configuration, e.g. sst2"), ("train_split", "default: "
                        "train"), ("text_column", "default: sentence, else text"), ("label_column", "default: label, "
                        "else labels"), ("eval_split", "default: validation, else dev"), ("test_split", "the second "
                        "evaluation, if labelled (default: test)")):
        data.add_argument(f"--{flag}", help=about)

    student = argparse.ArgumentParser(add_help=False)
    student.add_argument("--rnn_hidden", type=positive_int, default=768,
                         help="student embedding and hidden size")
    student.add_argument("--rnn_layers", type=positive_int, default=2, help="stacked recurrent layers")
    student.add_argument("--rnn_cell", default="rnn", choices=["rnn", "gru", "lstm"], help="recurrent cell")
    student.add_argument("--clip", type=non_negative_float, default=1.0,
                         help="gradient-norm clipping, 0 for none (ReLU RNNs explode without it)")
    student.add_argument("--epochs", type=non_negative_int, default=5, help="0 prints the parameter table only")
    groups.train, groups.data, groups.student = train, data, student


def add_gen(sub, groups):
    g = sub.add_parser("gen", parents=[groups.seeded], help="generate text")
    g.add_argument("--gpt_variant", help="gpt2, gpt2-medium, gpt2-large, gpt2-xl, any Hugging Face GPT-2 id, or a "
                   "local folder in transformers' format (default: the --adapter's base, else gpt2)")
    g.add_argument("--random_init", action="store_true", help="the variant's architecture with random weights")
    prompt = g.add_mutually_exclusive_group()
    prompt.add_argument("--prompt", help=f"text to continue (default: {GEN_PROMPT!r})")
    prompt.add_argument("--prompt_file", help="read the prompt from this file")
    g.add_argument("--adapter", metavar="FOLDER", help="decode with this LoRA adapter (PEFT's CAUSAL_LM format) "
                   "merged into its base")
    g.add_argument("--max_new_tokens", type=positive_int, default=100, help="tokens to generate per sample")
    g.add_argument("--temperature", type=non_negative_float, help="0 means greedy (default: 1)")
    g.add_argument("--top_k", type=positive_int, default=50, help="sample among the k most likely tokens")
    g.add_argument("--top_p", type=number_in(float, 0, 1, low_open=True), default=None,
                   help="nucleus sampling: keep the most likely tokens up to this probability mass")
    g.add_argument("--repetition_penalty", type=positive_float, default=1.0, help="CTRL's penalty; 1 is none")
    g.add_argument("--greedy", action="store_true", help="always the most likely token")
    g.add_argument("--ignore_eos", action="store_true", help="keep going past <|endoftext|>")
    g.add_argument("--num_samples", type=positive_int, default=1, help="samples to draw, in one batch (seeds "
                   "--seed, --seed+1, ...); sample 1 streams, the rest print at the end")
    g.add_argument("--no_stream", action="store_true", help="print each sample when it is complete")
    g.add_argument("--no_repeat_ngram_size", type=non_negative_int, default=0, help="never let an n-gram of this "
                   "size occur twice in prompt + output (0: no ban)")
    g.add_argument("--num_beams", type=positive_int, default=1, help="beam search with this many beams "
                   "(transformers' semantics); 1: sample or --greedy")
    g.add_argument("--length_penalty", type=float, help="beam search: a hypothesis scores its log-probability / "
                   "length ** this; > 0 favours longer ones (default: 1)")
    g.add_argument("--early_stopping", nargs="?", const="true", choices=["true", "false", "never"],
                   help="beam search: true stops once num_beams hypotheses end, false (default) when none can "
                   "still win by transformers' estimate, never when none can win at the longest length")
    g.add_argument("--quantize", choices=["int8"], help="int8 weights (one scale per output channel) for the "
                   "blocks and the head: a quarter of fp32's bytes to read per token (errors: see README)")
    g.add_argument("--dataset", help="generation as evaluation: decode every prompt of this dataset's evaluation "
                   "split (a Hugging Face id or a local folder) and score BLEU and ROUGE-L against its references")
    for flag, about in (("dataset_config", "the hub dataset's configuration"), ("eval_split", "the split to decode "
                        "(default: validation, else dev)"), ("prompt_column", "--dataset: the prompts' column"),
                        ("completion_column", "--dataset: the references' column")):
        g.add_argument(f"--{flag}", help=about)
    g.set_defaults(func=cmd_gen, check=check_gen)


def add_lora(sub, groups):
    lora = sub.add_parser("LoRA", parents=[groups.seeded, groups.gpt, groups.train, groups.data],
                          help="LoRA fine-tuning of GPT-2 on CoLA or another dataset")
    lora.add_argument("--LoRA_rank", "--lora_rank", type=positive_int, default=4, help="rank r of the update B A")
    lora.add_argument("--lora_alpha", type=positive_float, help="scale numerator (default: the rank, i.e. scale 1)")
    lora.add_argument("--lora_dropout", type=number_in(float, 0, 1, high_open=True), default=0.0,
                      help="dropout on the LoRA branch's input")
    lora.add_argument("--lora_targets", nargs="+", choices=LORA_TARGETS, default=list(LORA_TARGETS),
                      help="the linear layers of each block that get LoRA")
    lora.add_argument("--epochs", type=non_negative_int, default=10, help="0 prints the parameter table only")
    lora.add_argument("--model_path", help="adapter folder to write (default models/LoRA-<variant>, with --task lm "
                      "models/LoRA-<variant>-lm)")
    lora.add_argument("--task", choices=["classify", "lm"], default="classify", help="classify: a score head on "
                      "the last token, trained on labels; lm: GPT-2's own next-token loss on text blocks or on "
                      "prompt -> completion pairs (a CAUSAL_LM adapter for `gen --adapter`)")
    lora.add_argument("--block_size", type=positive_int, help="--task lm: tokens per text block, and the longest "
                      "prompt + completion kept (default: 256, or the model's context if shorter)")
    lora.add_argument("--prompt_column", help="--task lm: train on prompt -> completion pairs, the prompt from this "
                      "column (its tokens are inputs, never targets)")
    lora.add_argument("--completion_column", help="--task lm: the completion of each pair (needs --prompt_column)")
    lora.add_argument("--generate_eval", type=non_negative_int, default=0, metavar="MAX_NEW_TOKENS",
                      help="--task lm on pairs: after training, decode every validation prompt greedily (up to this "
                      "many new tokens) with the adapter and with its base, and score BLEU and ROUGE-L as `gen "
                      "--dataset` does (0: do not)")
    lora.set_defaults(func=cmd_lora, check=check_lora)


def add_students(sub, groups):
    rnn = sub.add_parser("rnn", parents=[groups.seeded, groups.train, groups.data, groups.student],
                         help="train the DistilRNN student on labels")
    rnn.add_argument("--model_path", default="models/rnn", help="student checkpoint folder to write")
    rnn.set_defaults(func=cmd_rnn, check=lambda parser, args: check_training(parser, args, "model_path"))

    distil = sub.add_parser("distil", parents=[groups.seeded, groups.train, groups.data, groups.student],
                            help="distil the LoRA-tuned GPT-2 into the DistilRNN student")
    distil.add_argument("--gpt_variant", help="the teacher's base (default: the one the adapter names)")
    distil.add_argument("--model_path", help="the teacher's adapter folder (default models/LoRA-<variant>)")
    distil.add_argument("--student_path", default="models/distil-rnn", help="student checkpoint folder to write")
    distil.add_argument("--temperature", type=positive_float, default=2.0, help="softmax temperature T of the KD loss")
    distil.add_argument("--alpha", type=fraction, default=0.5, help="weight of the soft (KL) part; 1-alpha on labels")
    distil.add_argument("--kd_loss", default="kl", choices=["kl", "mse"], help="the soft term: Hinton's KL at "
                        "--temperature, or Tang et al.'s squared distance between the logits (no temperature)")
    distil.add_argument("--augment", type=non_negative_int, default=0, help="add this many sentences per training "
                        "sentence, made by Tang et al.'s rules, to the transfer set the teacher labels")
    distil.add_argument("--p_mask", type=fraction, default=0.1, help="--augment: chance a word is masked (as ___)")
    distil.add_argument("--p_replace", type=fraction, default=0.1, help="--augment: chance a word not masked is "
                        "replaced by a draw from the training corpus' unigram distribution")
    distil.add_argument("--p_ngram", type=fraction, default=0.25, help="--augment: chance a sentence is then cut to "
                        "a random n-gram, n in 1..5")
    distil.add_argument("--transfer_gen", type=non_negative_int, default=0, help="add this many sentences sampled "
                        "from the teacher's GPT-2 base, prompted with 1-3 first words of training sentences, to the "
                        "transfer set")
    distil.set_defaults(func=cmd_distil, check=check_distil)


def add_model_use(sub, groups):
    predict = sub.add_parser("predict", parents=[groups.compute, groups.data],
                             help="classify sentences with a trained model")
    predict.add_argument("--model_path", required=True, help="a LoRA adapter folder or a student checkpoint")
    predict.add_argument("--gpt_variant", help="GPT-2 base for an adapter (default: the one it names)")
    source = predict.add_mutually_exclusive_group()
    source.add_argument("--sentence", action="append", help="a sentence to classify (repeatable)")
    source.add_argument("--input", help="one sentence per line, a CoLA-format TSV, or a csv / tsv / json / jsonl "
                        "/ parquet file read with --text_column, --label_column (with labels, the scores too)")
    predict.add_argument("--format", default="table", choices=["table", "jsonl", "tsv"], help="output format")
    predict.add_argument("--batch_size", type=positive_int, default=128, help="sentences per forward pass")
    predict.add_argument("--quantize", choices=["int8"], help="int8 weights for the blocks and the head "
                         "(GPT-2 classifiers): about half the memory; slower than fp32 for large batches")
    predict.set_defaults(func=cmd_predict, check=check_model_use)

    export = sub.add_parser("export", parents=[groups.common],
                            help="write a LoRA-tuned classifier or language model as a plain Hugging Face "
                            "checkpoint, LoRA merged")
    export.add_argument("--model_path", required=True, help="the adapter folder")
    export.add_argument("--gpt_variant", help="GPT-2 base (default: the one the adapter names)")
    export.add_argument("--out", required=True, help="folder to write (config.json + model.safetensors)")
    export.set_defaults(func=cmd_export, check=check_model_use, device="cpu", dtype="float32")  # fixed, no flags


def add_tune(sub):
    sweep = sub.add_parser("tune", help="sweep seeds x a grid of flags of LoRA, rnn or distil, or search them with "
                           "Optuna", description=(
        "Example: python run.py tune distil --seeds 1 2 3 --grid temperature=1,2,4 alpha=0.3,0.5,0.9 --epochs 3; "
        "or --search optuna --space temperature=log:1:8 alpha=float:0.1:0.9 --trials 30. Any other flag is passed "
        "to every run."))
    sweep.add_argument("target", choices=tune.TUNABLE, help="the subcommand to sweep")
    sweep.add_argument("--seeds", nargs="+", type=seed_int, default=[0, 1, 2],
                       help="each configuration runs once per seed")
    sweep.add_argument("--grid", nargs="+", default=[], metavar="FLAG=V1,V2", help="values to sweep, per flag")
    sweep.add_argument("--name", help="names tuning/<name>.md and plots/tune_<name>.png, and the study (default: "
                       "from the grid or the space)")
    sweep.add_argument("--parallel", type=positive_int, default=1,
                       help="run this many configurations (grid) or workers (optuna) side by side, one process each "
                       "(each on a visible GPU if any)")
    sweep.add_argument("--search", choices=["grid", "optuna"], default="grid", help="grid: every configuration "
                       "of --grid; optuna: --trials configurations drawn from --space, in a study workers share")
    sweep.add_argument("--space", nargs="+", default=[], metavar="FLAG=KIND:...", help="--search optuna: each "
                       "flag's range, log:LOW:HIGH, float:LOW:HIGH, int:LOW:HIGH or cat:A,B,...")
    sweep.add_argument("--trials", type=positive_int, help="--search optuna: finished (complete or pruned) "
                       f"trials the study is to reach, over all its workers (default: {search.DEFAULTS['trials']})")
    sweep.add_argument("--sampler", choices=["tpe", "random"], help="--search optuna: how trials are drawn; trial "
                       "k's sampler is seeded with k (default: tpe)")
    sweep.add_argument("--pruner", choices=["median", "none"], help="--search optuna: median stops a trial whose "
                       "dev metric after an epoch is below the median of earlier trials' there (default: median)")
    sweep.add_argument("--metric", choices=list(search.METRICS), help="--search optuna: the mean dev metric a "
                       "trial is scored by; perplexity is minimized (default: acc; LoRA --task lm: perplexity)")
    sweep.add_argument("--storage", metavar="URL", help="--search optuna: the study's database URL (sqlite:///..., "
                       "postgresql://..., mysql://...) or a journal file on a shared filesystem (default: "
                       "sqlite:///tuning/<name>.db)")
    sweep.add_argument("--restart", action="store_true", help="start the runs an earlier sweep left interrupted "
                       "over, instead of resuming them from their saved state")
    sweep.add_argument("--debug", action="store_true", help="show full tracebacks")
    sweep.set_defaults(func=None, check=check_tune)


def execute(args):
    """Run a parsed subcommand on the device and dtype its flags ask for, resolved here once."""
    device = resolve_device(args.device)
    args.func(args, device, compute_dtype(args.dtype, device, args.mode in tune.TUNABLE))


# tune's two kinds of sweep: (the plan, checked before anything runs; what runs it)
SWEEPS = {"grid": (tune.tune_plan, tune.sweep), "optuna": (search.search_plan, search.optimize)}


def main(argv=None):
    """Run one subcommand; every failure ends in one line on stderr (the traceback only with --debug)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if rest and args.mode != "tune":  # a sweep passes the flags it does not know to every run
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        args.check(parser, args)
        plan = SWEEPS[args.search][0](parser, args, rest) if args.mode == "tune" else None
        init_distributed()
        if not is_main():  # under torchrun only rank 0 prints
            sys.stdout = open(os.devnull, "w")
        with sigterm_as_interrupt():  # SIGTERM stops a run as Ctrl-C does
            SWEEPS[args.search][1](args, plan, execute, argv) if plan else execute(args)
    except (UserError, ModelError) as e:  # both name what to fix, in one line
        print(f"error: {e}", file=sys.stderr)
        if args.debug:
            traceback.print_exc()
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt as e:
        print(f"error: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return interrupt_exit_code(e)
    except OSError as e:  # a full disk, a quota, a folder gone read-only: which file, and why
        if args.debug:
            raise
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:
        if args.debug:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        print(f"error: unexpected {type(e).__name__}: {reason} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
