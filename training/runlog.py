"""What a run leaves behind besides its model: its record in tuning/<mode>.jsonl (rewritten after every epoch),
the state --resume continues from, and the TensorBoard log."""
import json
import os
import sys
import time
from pathlib import Path

import torch

from textdata.batches import data_fingerprint
from textdata.readers import run_stem
from runtime.distributed import broadcast_from_main, is_main, on_main, rank, world_size
from model import count_parameters
from training.report import draw_history
from utils import UserError, atomic_path, write_text


TUNING_DIR = "tuning"  # run logs, relative to where a run is started


def flags(args):
    """A parsed command line's flags: the namespace less the subcommand's function and check, which argparse keeps
    beside them, and the trial of a search that runs it (see RunWatch)."""
    return {k: v for k, v in vars(args).items() if k not in ("func", "check", "trial")}


def result_flags(args):
    """The flags that decide a run's result: a resumed run must share them with the run it continues, and a sweep
    skips a run already logged with them (and the same --epochs). Where it runs and how it reports do not count."""
    ignored = ("resume", "debug", "epochs", "device", "compile", "tensorboard", "micro_batch_tokens", "generate_eval")
    return {k: v for k, v in flags(args).items() if k not in ignored}


def write_jsonl_record(path, record, key=None):
    """Add `record` as one JSON line to `path`, replacing the line whose `key` field has the same value if there is
    one. The file is rewritten atomically (a crash never leaves half a line) under a lock on its folder, so that
    runs side by side (tune --parallel) never lose each other's lines; the lock leaves no file behind."""
    import fcntl
    folder = Path(path).parent
    folder.mkdir(parents=True, exist_ok=True)
    fd = os.open(folder, os.O_RDONLY)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        lines = Path(path).read_text(encoding="utf-8").splitlines() if Path(path).exists() else []
        if key is not None:
            lines = [line for line in lines if (json_record(line) or {}).get(key) != record[key]]
        write_text(path, "".join(line + "\n" for line in lines) + json.dumps(record) + "\n")
    finally:
        os.close(fd)  # releases the lock


def read_jsonl(path):
    """The records of a JSONL log. A line that is not a JSON object (a log edited by hand, or cut short by a full
    disk) is skipped with a warning, so that one bad line does not stop every later run."""
    if not Path(path).exists():
        return []
    records = []
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), start=1):
        record = json_record(line)
        if record is not None:
            records.append(record)
        elif line.strip():
            print(f"warning: {path}:{number}: not a JSON record, ignored", file=sys.stderr)
    return records


def json_record(line):
    """The JSON object on `line`, or None if it holds none."""
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


def resume_state_path(out_path):
    return Path(f"{str(out_path).rstrip('/')}.resume.pt")


def trainable_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


START_OVER = "rerun without --resume to start over (in a sweep: with --restart)"


def save_run_state(path, run, model, optimizer, scaler, generator, config, rng, data):
    """Everything needed to continue after the last finished epoch, written atomically, with the fingerprint of
    each split it trained and evaluated on (`data`: batches.split_fingerprints)."""
    state = dict(run, model=trainable_state(model), optimizer=optimizer.state_dict(), scaler=scaler.state_dict(),
                 generator=generator.get_state(), rng=rng, config=config, data=data)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_run_state(path, config, data):
    """A saved run, refusing one made with other flags or on other data (a changed split would mix epochs on
    two datasets in one run)."""
    try:
        state = torch.load(path, weights_only=True, map_location="cpu")
    except FileNotFoundError:
        raise UserError(f"--resume: no saved run at {path}; start the run without --resume") from None
    except Exception as e:
        raise UserError(f"{path}: corrupt or truncated run state ({type(e).__name__})") from None
    changed = [k for k in config if state["config"].get(k) != config[k]]
    if changed:
        k = changed[0]
        raise UserError(f"{path}: saved with --{k} {state['config'].get(k)}, this run has --{k} {config[k]}; "
                        f"rerun with the same flags, or {START_OVER}")
    changed = [name for name in data if state.get("data", data).get(name) != data[name]]
    if changed:
        raise UserError(f"{path}: saved on other data: the {changed[0]!r} split has changed since (rows added, "
                        f"removed or relabelled); {START_OVER}")
    if len(state["rng"]) != world_size():
        raise UserError(f"{path}: saved by {len(state['rng'])} processes, resumed by {world_size()}")
    return state


def load_run_state(path, model, optimizer, scaler, generator, config, data):
    """Restore a run saved by save_run_state. Rank 0 reads the file and every rank gets its content (or the
    same error), so several machines need not share a disk."""
    state, error = None, None
    if is_main():
        try:
            state = read_run_state(path, config, data)
        except UserError as e:
            error = str(e)
    state, error = broadcast_from_main((state, error))
    if error:
        raise UserError(error)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    if state.get("scaler"):  # fp16 runs: the loss scale reached
        scaler.load_state_dict(state["scaler"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"][rank()]["cpu"])
    if state["rng"][rank()]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"][rank()]["cuda"])
    return {k: state[k] for k in ("run_id", "epoch", "history", "best_epoch", "best_score", "best_state", "best_dev")}


def run_record(mode, args, device, dtype, splits, model, run, s, seconds, plots):
    """The run's line in its log: every flag, per-epoch metrics, the best epoch, what the objective records of the
    final scores (`s["record"]`: a classifier's predictions, dev probabilities and calibration; a language model's
    perplexities beside its base model's), timing."""
    total, trainable = count_parameters(model)
    return {"mode": mode, "task": splits.task, "time": time.strftime("%Y-%m-%dT%H:%M:%S"), "args": flags(args),
            "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": data_fingerprint(splits),
            "parameters": total, "trainable_parameters": trainable, "history": run["history"],
            "best_epoch": run["best_epoch"], **s["record"], "wall_seconds": seconds, "plots": plots}


def progress_record(mode, args, device, dtype, splits, data, run):
    """The run's line in tuning/<mode>.jsonl while it trains: rewritten after every epoch and marked unfinished,
    so that a run stopped midway still shows its epochs and a sweep never counts it as done."""
    return {"mode": mode, "run_id": run["run_id"], "finished": False, "time": time.strftime("%Y-%m-%dT%H:%M:%S"),
            "task": splits.task,
            "args": flags(args), "device": str(device), "dtype": str(dtype).removeprefix("torch."), "data": data,
            "history": run["history"], "best_epoch": run["best_epoch"]}


class Pruned(Exception):
    """A search stopped the run after an epoch: its trial scores worse than the others did at that point."""


class RunWatch:
    """What a run shows while it trains and records when it ends, written by rank 0 alone: the plots after every
    epoch, its line in tuning/<mode>.jsonl (tuning/<mode>-<dataset>.jsonl past CoLA; unfinished until the end), and
    TensorBoard (--tensorboard).

    A run that a search starts carries its trial as `args.trial` (search.TrialHook): every record of the run gets
    the trial's `fields()`, and each epoch's row goes to `report(row)`; when that says the trial is pruned, the
    run's record says so (unfinished, `"pruned": true`) and the run stops with Pruned."""

    def __init__(self, mode, args, device, dtype, splits, baseline):
        self.mode, self.args, self.device, self.dtype, self.splits = mode, args, device, dtype, splits
        self.log = f"{TUNING_DIR}/{run_stem(mode, splits.spec)}.jsonl"
        self.data, self.baseline = data_fingerprint(splits), baseline  # the plots' reference line
        self.board = TensorBoardLog.open(args, mode) if is_main() else None
        self.trial = getattr(args, "trial", None)
        self.trial_fields = self.trial.fields() if self.trial else {}

    def step(self, step, loss):
        if self.board:
            self.board.step(step, loss)

    def epoch(self, run):
        pruned = bool(self.trial and self.trial.report(run["history"][-1]))
        on_main(lambda: self.write_progress(run, {"pruned": True} if pruned else {}))
        if pruned:
            raise Pruned(f"pruned after epoch {run['epoch']}")

    def write_progress(self, run, extra):
        draw_history(run, self.mode, self.splits, self.baseline)
        record = progress_record(self.mode, self.args, self.device, self.dtype, self.splits, self.data, run)
        write_jsonl_record(self.log, record | self.trial_fields | extra, key="run_id")
        if self.board:
            self.board.epoch(run["history"][-1], self.args.lr)

    def finish(self, run, model, s, seconds, extra=None):
        """The finished run's plots and its record (returned), which replaces its unfinished line."""
        plots = draw_history(run, self.mode, self.splits, self.baseline)
        record = run_record(self.mode, self.args, self.device, self.dtype, self.splits, model, run, s, seconds,
                            plots)
        record |= {"run_id": run["run_id"], "finished": True, **self.trial_fields, **(extra or {})}
        write_jsonl_record(self.log, record, key="run_id")
        print(f"plots: {', '.join(plots)}; run logged to {self.log}")
        return record

    def close(self):
        if self.board:
            self.board.close()


class TensorBoardLog:
    """--tensorboard: each step's training loss; each epoch's train and dev loss, accuracy and MCC, the learning
    rate and tokens/s; the run's flags as hyper-parameters. `tensorboard --logdir runs` compares runs."""

    def __init__(self, log_dir, hyper_parameters):
        from torch.utils.tensorboard import SummaryWriter
        from torch.utils.tensorboard.summary import hparams
        self.writer, self.done, self.last = SummaryWriter(log_dir), 0, 0  # steps of earlier epochs, last step seen
        metrics = {"dev/acc": 0.0, "dev/mcc": 0.0, "dev/loss": 0.0}  # HParams reads their values from the scalars
        experiment, start, self.end = hparams(hyper_parameters, metrics)
        self.writer.file_writer.add_summary(experiment)
        self.writer.file_writer.add_summary(start)

    @classmethod
    def open(cls, args, mode):
        """The log --tensorboard asks for (its folder, or runs/<mode>-<time>-<process id>), or None."""
        if not getattr(args, "tensorboard", None):
            return None
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # unique among a sweep's runs side by side
        folder = args.tensorboard if args.tensorboard != "auto" else f"runs/{mode}-{stamp}"
        print(f"TensorBoard log: {folder} (view with `tensorboard --logdir {Path(folder).parent}`)")
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in flags(args).items()}
        return cls(folder, plain)

    def step(self, step, loss):
        """The loss of `step` of the current epoch (every step on a CPU; on CUDA, each step whose loss is read)."""
        self.last = step
        self.writer.add_scalar("train/step_loss", loss, self.done + step)

    def epoch(self, row, lr):
        for key in ("train_loss", "train_acc", "dev_loss", "dev_acc", "dev_mcc", "dev_perplexity",
                    "train_tokens_per_s"):
            if key in row:  # a classifier has an MCC, a language model a perplexity
                self.writer.add_scalar(key.replace("_", "/", 1), row[key], row["epoch"])
        self.writer.add_scalar("train/lr", lr, row["epoch"])
        self.writer.flush()
        self.done += self.last

    def close(self):
        self.writer.file_writer.add_summary(self.end)
        self.writer.close()
