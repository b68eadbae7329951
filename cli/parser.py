"""The command line, made from the configurations' fields: each subcommand's flags are the fields of its
configuration (config.subcommands), with the help, type and default each field declares. The parsed Namespace
lives only here: `config_of` turns it into the subcommand's configuration, and `command_line` turns a
configuration back into the flags that make it (a sweep's runs started as processes)."""
import argparse
import sys

from config.fields import build, class_defaults, flat_values
from config.subcommands import SUBCOMMANDS
from utils import UsageError


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
    """The whole command line (its subcommands are OneLineParsers), reading the assignment's form as ours."""

    def parse_known_args(self, args=None, namespace=None):
        return super().parse_known_args(assignment_argv(sys.argv[1:] if args is None else args), namespace)


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


HELP = {"gen": "generate text", "LoRA": "LoRA fine-tuning of GPT-2 on CoLA or another dataset",
        "rnn": "train the DistilRNN student on labels", "distil": "distil the LoRA-tuned GPT-2 into the DistilRNN student",
        "predict": "classify sentences with a trained model",
        "export": "write a LoRA-tuned classifier or language model as a plain Hugging Face checkpoint, LoRA merged",
        "tune": "sweep seeds x a grid of flags of LoRA, rnn or distil, or search them with Optuna",
        "info": "versions, hardware, what would be chosen here, where data is",
        "report": "the runs' numbers, tables and plots as report/report.md and a self-contained report.html"}
DESCRIPTIONS = {"tune": "Example: python run.py tune distil --seeds 1 2 3 --grid temperature=1,2,4 alpha=0.3,0.5,0.9 "
                "--epochs 3; or --search optuna --space temperature=log:1:8 alpha=float:0.1:0.9 --trials 30. Any other "
                "flag is passed to every run."}


def offered(cls):
    """[(field, default)] of the flags of a subcommand: its configuration's fields less those it leaves out."""
    return [(f, default) for _, f, default in class_defaults(cls) if f.name not in cls.LEFT_OUT]


def argparse_options(f, default):
    """add_argument's keywords for the flag a field declares."""
    m = f.metadata
    options = {"help": m["help"], "default": list(default) if isinstance(default, tuple) else default}
    if m["switch"]:
        options["action"] = "store_true"
    elif m["append"]:
        options["action"] = "append"
    options |= {key: m[key] for key in ("type", "choices", "nargs", "const", "metavar") if m[key] is not None}
    if m["required"]:
        options["required"] = True
    if m["positional"]:
        del options["default"]
    return options


def add_flags(parser, cls):
    exclusive = {}
    for f, default in offered(cls):
        group = f.metadata["exclusive"]
        if group and group not in exclusive:
            exclusive[group] = parser.add_mutually_exclusive_group()
        target = exclusive[group] if group else parser
        names = [f.name] if f.metadata["positional"] else [f"--{f.name}", *f.metadata["names"]]
        target.add_argument(*names, **argparse_options(f, default))


def build_parser():
    """The command line: one subparser per subcommand, its flags its configuration's."""
    parser = CommandLine(description="GPT-2 generation, LoRA fine-tuning and distillation on CoLA.")
    sub = parser.add_subparsers(dest="mode", required=True, parser_class=OneLineParser)
    for mode, cls in SUBCOMMANDS.items():
        add_flags(sub.add_parser(mode, help=HELP[mode], description=DESCRIPTIONS.get(mode)), cls)
    return parser


def config_of(namespace):
    """The subcommand's configuration of a parsed command line."""
    values = vars(namespace)
    return build(SUBCOMMANDS[values["mode"]], {k: v for k, v in values.items() if k != "mode"})


def command_line(config):
    """The flags after `run.py` that make `config` again: the subcommand, then each flag whose value is not its
    default."""
    values, argv = flat_values(config), [config.MODE]
    for f, default in offered(type(config)):
        value, m = values[f.name], f.metadata
        if m["positional"]:
            argv.insert(1, str(value))
        elif value == default or value is None or value is False:
            continue
        elif m["switch"]:
            argv.append(f"--{f.name}")
        elif m["append"]:
            argv += [a for v in value for a in (f"--{f.name}", str(v))]
        elif isinstance(value, tuple):
            argv += [f"--{f.name}", *map(str, value)]
        else:
            argv += [f"--{f.name}", str(value)]
    return argv


class RaisingParser(argparse.ArgumentParser):
    """A parser whose usage error is a UsageError, for values read outside a command line."""

    def error(self, message):
        raise UsageError(message)


def typed_values(cls, texts):
    """{field name: value} of flag values given as text ({field name: text}, a sweep's grid or a trial's draw),
    each read as its flag is: its type, its choices, its nargs."""
    known = {f.name: (f, default) for f, default in offered(cls)}
    unknown = next((name for name in texts if name not in known or known[name][0].metadata["positional"]), None)
    if unknown:
        raise UsageError(f"unrecognized arguments: --{unknown} {texts[unknown]}")
    parser = RaisingParser(add_help=False, allow_abbrev=False)
    for name in texts:
        parser.add_argument(f"--{name}", **argparse_options(*known[name]))
    values = vars(parser.parse_args([a for name, text in texts.items() for a in (f"--{name}", text)]))
    return {name: values[name] for name in texts}
