"""Command line: `python run.py {gen,LoRA,rnn,distil,predict,export,tune,info,report} ...`. Parse, make the
configuration, check it, call."""
import os
import sys
import traceback

from cli import grid_sweep, optuna_search
from cli.commands import COMMANDS
from cli.parser import build_parser, config_of
from config.subcommands import TUNABLE
from model import ModelError
from runtime.devices import compute_dtype, resolve_device
from runtime.distributed import init_distributed, is_main
from utils import Terminated, UsageError, UserError, interrupt_exit_code, sigterm_as_interrupt


def execute(config, trial=None):
    """Run a subcommand's configuration on the device and dtype it asks for, resolved here once; a search's `trial`
    (cli.optuna_search.TrialHook) watches a training run's epochs."""
    device = resolve_device(config.run.device)
    dtype = compute_dtype(config.run.dtype, device, config.MODE in TUNABLE)
    COMMANDS[config.MODE](config, device, dtype, **({"trial": trial} if trial else {}))


# tune's two kinds of sweep: (the plan, checked before anything runs; what runs it)
SWEEPS = {"grid": (grid_sweep.tune_plan, grid_sweep.sweep), "optuna": (optuna_search.search_plan,
                                                                        optuna_search.optimize)}


def validated(parser, config, rest):
    """Validate a configuration (a sweep: plan it, every run validated too) and return the sweep's plan, or None; a
    usage error is one line, exit 2, before anything is built or downloaded."""
    try:
        config.validate()
        return SWEEPS[config.search][0](parser, config, rest) if config.MODE == "tune" else None
    except UsageError as e:
        parser.error(str(e))


def main(argv=None):
    """Run one subcommand; every failure ends in one line on stderr (the traceback only with --debug)."""
    parser = build_parser()
    argv = sys.argv[1:] if argv is None else argv
    args, rest = parser.parse_known_args(argv)
    if rest and args.mode != "tune":  # a sweep passes the flags it does not know to every run
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    config = config_of(args)  # the Namespace ends here
    debug = config.run.debug
    try:
        plan = validated(parser, config, rest)
        init_distributed()
        if not is_main():  # under torchrun only rank 0 prints
            sys.stdout = open(os.devnull, "w")
        with sigterm_as_interrupt():  # SIGTERM stops a run as Ctrl-C does
            SWEEPS[config.search][1](config, plan, execute, argv) if plan else execute(config)
    except (UserError, ModelError) as e:  # both name what to fix, in one line
        print(f"error: {e}", file=sys.stderr)
        if debug:
            traceback.print_exc()
        return getattr(e, "exit_code", 1)
    except KeyboardInterrupt as e:
        print(f"error: {'terminated (SIGTERM)' if isinstance(e, Terminated) else 'interrupted'}", file=sys.stderr)
        return interrupt_exit_code(e)
    except OSError as e:  # a full disk, a quota, a folder gone read-only: which file, and why
        if debug:
            raise
        print(f"error: {f'{e.filename}: ' if e.filename else ''}{e.strerror or e}", file=sys.stderr)
        return 1
    except Exception as e:
        if debug:
            raise
        reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
        print(f"error: unexpected {type(e).__name__}: {reason} (rerun with --debug for the traceback)",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
