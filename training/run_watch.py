"""What a run shows while it trains and records when it ends: the plots after every epoch, its line in
tuning/<mode>.jsonl (unfinished until the end), and the TensorBoard log."""
import os
from pathlib import Path
import time

from config.fields import flat_values
from config.records import config_fields, write_jsonl_record
from model import count_parameters
from runtime.distributed import is_main, on_main
from runtime.provenance import provenance
from textdata.batches import data_fingerprint
from textdata.readers import run_stem
from training.plots import draw_history
from utils import TUNING_DIR


def when_and_where(device, dtype):
    """The fields every record states of its run: when it was written, the device and the dtype."""
    return {"time": time.strftime("%Y-%m-%dT%H:%M:%S"), "device": str(device),
            "dtype": str(dtype).removeprefix("torch.")}


def run_record(header, device, dtype, splits, model, run, s, seconds, plots):
    """The run's line in its log: its configuration and provenance (`header`: config.records.config_fields and
    runtime.provenance.provenance), per-epoch metrics,
    the best epoch, what the objective records of the final scores (`s["record"]`: a classifier's predictions, dev
    probabilities and calibration; a language model's perplexities beside its base model's), timing."""
    total, trainable = count_parameters(model)
    return {**header, "task": splits.task, **when_and_where(device, dtype), "data": data_fingerprint(splits),
            "parameters": total,
            "trainable_parameters": trainable, "history": run["history"], "best_epoch": run["best_epoch"],
            **s["record"], "wall_seconds": seconds, "plots": plots}


def progress_record(header, device, dtype, splits, data, run):
    """The run's line in tuning/<mode>.jsonl while it trains: rewritten after every epoch and marked unfinished,
    so that a run stopped midway still shows its epochs and a sweep never counts it as done."""
    return {**header, "run_id": run["run_id"], "finished": False, **when_and_where(device, dtype),
            "task": splits.task, "data": data, "history": run["history"], "best_epoch": run["best_epoch"]}


class Pruned(Exception):
    """A search stopped the run after an epoch: its trial scores worse than the others did at that point."""


def run_name(config):
    """What the run is called in its plots and summary: the mode, and for LoRA a --method other than lora
    (LoRA-full, LoRA-head)."""
    method = lora_method(config)
    return config.MODE if method in (None, "lora") else f"{config.MODE}-{method}"


def lora_method(config):
    """What a LoRA run trained (--method; a record from before the flag: lora), None for the other modes."""
    return getattr(config.lora, "method", "lora") if config.MODE == "LoRA" else None


class RunWatch:
    """What a run shows while it trains and records when it ends, written by rank 0 alone: the plots after every
    epoch, its line in tuning/<mode>.jsonl (tuning/<mode>-<dataset>.jsonl past CoLA; unfinished until the end), and
    TensorBoard (RunOptions.tensorboard).

    `config` is the run's whole configuration, which its record holds. A run that a search starts has the trial
    watching it (`trial`: cli.optuna_search.TrialHook): every record of the run gets the trial's `fields()`, and
    each epoch's row goes to `report(row)`; when that says the trial is pruned, the run's record says so
    (unfinished, `"pruned": true`) and the run stops with Pruned."""

    def __init__(self, config, device, dtype, splits, baseline, trial=None):
        self.mode, self.header, self.lr = config.MODE, config_fields(config) | provenance(config), config.train.lr
        self.device, self.dtype, self.splits = device, dtype, splits
        self.log = f"{TUNING_DIR}/{run_stem(self.mode, splits.spec)}.jsonl"  # one log, which a sweep compares
        self.plots = run_name(config)  # plots/LoRA-full_loss.png beside LoRA's own
        self.data, self.baseline = data_fingerprint(splits), baseline  # the plots' reference line
        self.board = TensorBoardLog.open(config.run, self.mode, flat_values(config)) if is_main() else None
        self.trial, self.trial_fields = trial, trial.fields() if trial else {}

    def step(self, step, loss):
        if self.board:
            self.board.step(step, loss)

    def epoch(self, run):
        pruned = bool(self.trial and self.trial.report(run["history"][-1]))
        on_main(lambda: self.write_progress(run, {"pruned": True} if pruned else {}))
        if pruned:
            raise Pruned(f"pruned after epoch {run['epoch']}")

    def write_progress(self, run, extra):
        draw_history(run, self.plots, self.splits, self.baseline)
        record = progress_record(self.header, self.device, self.dtype, self.splits, self.data, run)
        write_jsonl_record(self.log, record | self.trial_fields | extra, key="run_id")
        if self.board:
            self.board.epoch(run["history"][-1], self.lr)

    def final_record(self, run, model, s, seconds, extra=None):
        """The finished run's plots, and its record (returned, not yet written: see `write`)."""
        plots = draw_history(run, self.plots, self.splits, self.baseline)
        record = run_record(self.header, self.device, self.dtype, self.splits, model, run, s, seconds, plots)
        return record | {"run_id": run["run_id"], "finished": True, **self.trial_fields, **(extra or {})}

    def write(self, record):
        """The finished run's record, which replaces its unfinished line."""
        write_jsonl_record(self.log, record, key="run_id")
        print(f"plots: {', '.join(record['plots'])}; run logged to {self.log}")

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
    def open(cls, options, mode, hyper_parameters):
        """The log `options.tensorboard` asks for (its folder, or runs/<mode>-<time>-<process id>), or None;
        `hyper_parameters` are the run's flag values."""
        if not options.tensorboard:
            return None
        stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"  # unique among a sweep's runs side by side
        folder = options.tensorboard if options.tensorboard != "auto" else f"runs/{mode}-{stamp}"
        print(f"TensorBoard log: {folder} (view with `tensorboard --logdir {Path(folder).parent}`)")
        plain = {k: v if isinstance(v, (int, float, str, bool)) else str(v) for k, v in hyper_parameters.items()}
        return cls(folder, plain | {"mode": mode})

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
