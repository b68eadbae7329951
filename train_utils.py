"""The one training loop and evaluation every mode uses.

A mode (LoRA, rnn, distil, LoRA --task lm) supplies a model and an objective (training.objective.Objective:
`Classification` here, training.kd_loss.KDLoss, training.lm_objective.NextToken): how the model is called, its
loss, what counts as correct, how a split is evaluated and what its epochs record; nothing else differs."""
import contextlib
from dataclasses import dataclass
import math
from pathlib import Path
import sys
import time
import uuid

import torch
import torch.nn.functional as F
from tqdm import tqdm

from config.fields import deciding_values
from config.records import read_record
from reporting.model_card import model_card
from runtime.devices import autocast, compiled, default_micro_batch_tokens, loss_scaler
from runtime.distributed import (all_reduce_sum, for_all_ranks, is_main, on_main, rank, rank_share, rng_states,
                                 world_size)
from textdata.batches import Split, bucketed_batches, collate, micro_batches, sorted_batches, split_fingerprints
from training.checkpoints import save_trained
from training.metrics import calibration, final_scores, majority_accuracy, matthews_corrcoef
from training.objective import Objective
from training.resume_state import load_run_state, resume_state_path, save_run_state, trainable_state
from training.run_watch import RunWatch, run_name
from training.tables import print_run_summary
from utils import Terminated, UserError, interrupt_exit_code


class Classification(Objective):
    """What a classifier trains for: cross-entropy on the labels (LoRA and the no-KD student); the best epoch has
    the highest dev accuracy."""

    def outputs(self, model, ids, lengths):
        return model(ids, lengths)

    def __call__(self, logits, labels, teacher=None):
        return F.cross_entropy(logits.float(), labels)

    def counts(self, logits, labels):
        """(right predictions, rows with a label), as tensors where they were computed."""
        return (logits.argmax(-1) == labels).sum(), (labels >= 0).sum()

    def evaluate(self, model, split, *, batch_size, device, dtype):
        """Loss, accuracy, MCC, logits and predictions (in split order) and inference speed on a labelled split."""
        start = time.perf_counter()
        logits = predict_logits(model, split.tokens, batch_size=batch_size, device=device, dtype=dtype)
        seconds = time.perf_counter() - start
        preds = logits.argmax(-1)
        acc = float((preds == split.labels).float().mean())
        return {"loss": float(self(logits, split.labels, split.teacher)), "acc": acc, "score": acc,
                "mcc": matthews_corrcoef(preds, split.labels), "sentences_per_s": len(split) / seconds,
                "preds": preds.tolist(), "logits": logits}

    def epoch_fields(self, train_loss, dev):
        return {"dev_acc": dev["acc"], "dev_mcc": dev["mcc"]}

    def baseline(self, model, splits, **kwargs):
        """The score to beat, drawn in the plots: the dev accuracy of always answering the majority class."""
        return majority_accuracy(splits)

    def conclude(self, model, splits, run, *, batch_size, device, dtype):
        """The best epoch's evaluations {split: evaluation} and scores: beside the majority class, calibrated on the
        held-out sentences, and the fields of the run's record."""
        final = self.final_evaluations(model, splits, run, batch_size=batch_size, device=device, dtype=dtype)
        s = final_scores(final, splits)
        s["calibration"] = calibrate(model, splits, final["dev"]["logits"], batch_size, device, dtype)
        s["record"] = classification_record(final, s, splits.evaluated)
        return final, s

    def print_summary(self, mode, run, epochs, s, splits):
        print_run_summary(mode, run["best_epoch"], epochs, s, splits)


cross_entropy = Classification()


def classification_record(final, s, names):
    """What a classifier's run record holds of its final scores: each evaluation split's scores beside the majority
    class, predictions, dev probabilities and calibration."""
    return {"majority_label": s["majority"], **{f"baseline_{name}_acc": s["baseline"][name]["acc"] for name in names},
            **{f"{name}_{k}": v for name in names for k, v in s["model"][name].items()},
            "dev_sentences_per_s": final["dev"]["sentences_per_s"],
            **{f"{name}_preds": final[name]["preds"] for name in names},
            "dev_probs": final["dev"]["logits"].softmax(-1).round(decimals=6).tolist(),
            "calibration": s["calibration"]}


class Diverged(UserError):
    """The loss became NaN or infinite."""


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM, with the exit code the signal calls for: `what` happened and what is on
    disk, then (`resumable`) how to continue, which a sweep replaces with its own command."""

    def __init__(self, what, exit_code, resumable=False):
        super().__init__(what + ("; rerun the same command with --resume to continue" if resumable else ""))
        self.what, self.exit_code = what, exit_code


def activation_bytes_per_token(model):
    """An estimate of what training keeps for backward per token: the input and output widths of every linear and
    recurrent layer, in fp32, four times over for what sits beside them (attention, GELU, LayerNorm, casts). A GPT-2
    with `grad_checkpoint` keeps each block's input alone (n_embd fp32 numbers) and rebuilds one block's activations
    at a time in the backward pass."""
    total = 16 * layer_widths(model)
    if not getattr(model, "grad_checkpoint", False):
        return total
    blocks = model.transformer.h
    block = 16 * layer_widths(blocks[0])
    return total - len(blocks) * block + block + len(blocks) * 4 * model.config.n_embd


def layer_widths(module):
    """The input plus output widths of the linear and recurrent layers in `module`."""
    width = 0
    for m in module.modules():
        if isinstance(m, torch.nn.Linear):
            width += m.in_features + m.out_features
        elif isinstance(m, torch.nn.RNNBase):
            width += m.num_layers * (m.input_size + 4 * m.hidden_size)
    return width


class PieceBudget:
    """Padded tokens per micro-batch (None: whole batches), halved for the rest of the run each time CUDA runs out of
    memory, down to one sentence per piece."""

    def __init__(self, tokens):
        self.tokens = tokens

    def pieces(self, rows, lengths):
        return micro_batches(rows, lengths, self.tokens)

    def halve(self, rows, lengths):
        longest = max(lengths[i] for i in rows)
        old = self.tokens or len(rows) * longest
        if old // longest <= 1:
            raise UserError(f"CUDA out of memory with one sentence ({longest} tokens) per piece, the least "
                            "--micro_batch_tokens can give: free GPU memory, or use a smaller --gpt_variant")
        self.tokens = old // 2
        tqdm.write(f"CUDA out of memory with pieces of {old} tokens: retrying the step, and going on, with "
                   f"{self.tokens} (--micro_batch_tokens sets it)", file=sys.stderr)


READ_EVERY = 50  # steps between two reads of the running sums on CUDA


def defers_reads(device):
    """On CUDA, reading a value back to the host waits for every queued kernel, so the loop reads its sums every
    READ_EVERY steps only; on a CPU a read costs nothing, and each step is read at once."""
    return device.type == "cuda"


class EpochSums:
    """An epoch's sums of loss (times its units), correct predictions, scored predictions, units, tokens and
    skipped steps, and its guard against a non-finite loss. Read at once per step (CPU: a NaN stops the run naming
    its step), or (CUDA) kept as tensors on the device and read every READ_EVERY steps (a NaN then names the steps
    since the last read)."""

    def __init__(self, device, desc):
        self.lazy, self.desc = defers_reads(device), desc
        self.loss, self.correct, self.scored, self.units, self.tokens, self.skipped = 0.0, 0, 0, 0, 0, 0
        self.step_loss, self.bad, self.last_read = 0.0, False, 0

    def add_step(self, step, pieces, weight, counts, grads_finite, scaling):
        """Add one step's pieces. A non-finite loss stops the run, and so do non-finite gradients without loss
        scaling; with it, their step is skipped by the scaler and counted here."""
        self.step_loss, bad_loss = 0.0, None
        for loss, correct, scored, units, tokens in pieces:
            if self.lazy:
                loss = loss.double()
                self.bad = self.bad | ~torch.isfinite(loss)
            else:
                loss, correct, scored = loss.item(), int(correct), int(scored)
                bad_loss = loss if bad_loss is None and not math.isfinite(loss) else bad_loss
            self.step_loss += loss * units * weight
            self.loss += loss * units * counts
            self.correct += correct * counts
            self.scored += scored * counts
            self.units += units * counts
            self.tokens += tokens * counts
        if self.lazy:
            self.bad = self.bad | (~grads_finite & (not scaling))
            self.skipped += ~grads_finite & scaling
        elif bad_loss is not None or not (grads_finite or scaling):
            raise Diverged(f"{self.desc}: loss became {'nan' if bad_loss is None else bad_loss} at step {step}; "
                           "try a lower --lr")
        else:
            self.skipped += int(not grads_finite)

    def due(self, step, steps):
        return not self.lazy or step % READ_EVERY == 0 or step == steps

    def read(self, step):
        """The last step's loss; on CUDA, first the check for a non-finite loss since the last read."""
        if self.lazy and bool(self.bad):
            raise Diverged(f"{self.desc}: loss became nan or inf in steps {self.last_read + 1}-{step} (on CUDA the "
                           f"loss is read every {READ_EVERY} steps); try a lower --lr")
        self.last_read = step
        return float(self.step_loss)

    def totals(self):
        return {"loss": float(self.loss), "correct": int(self.correct), "scored": int(self.scored),
                "units": self.units, "tokens": self.tokens, "skipped": int(self.skipped)}


def train_epoch(model, split, loss_fn, optimizer, *, batch_size, generator, device, dtype, clip=None,
                micro_batch_tokens=None, scaler=None, desc="train", on_step=None):
    """One pass over `split` in length-bucketed batches, each cut into micro-batches whose gradients accumulate.
    Returns this process's sums {loss, correct, scored, units, tokens, skipped} (summed over ranks by the caller
    under torchrun).

    `scaler` (fp16: see devices.loss_scaler) skips, and the sums count, a step whose gradients overflowed.
    `micro_batch_tokens` is a number or a PieceBudget, which a CUDA out-of-memory error halves. `on_step(step,
    loss)` follows each step whose loss is read (every step on a CPU)."""
    model.train()
    scaler = scaler or torch.amp.GradScaler(device.type, enabled=False)
    budget = micro_batch_tokens if isinstance(micro_batch_tokens, PieceBudget) else PieceBudget(micro_batch_tokens)
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lengths = [len(t) for t in split.tokens]
    sums = EpochSums(device, desc)
    # disable=None: a bar on a terminal, none in logs and CI (and on ranks other than 0)
    bar = tqdm(bucketed_batches(lengths, batch_size, generator), desc=desc, leave=False, dynamic_ncols=True,
               disable=None if is_main() else True)
    for step, index in enumerate(bar, start=1):
        # pieces: this rank's share of the batch. Under torchrun every rank draws the same global batch; DDP
        # averages gradients over ranks, so weighting each unit (a sentence, or a language model's target token)
        # world / units of the batch gives the batch's mean loss, however the units fall into pieces and ranks.
        rows, counts = rank_share(index)
        weight = counts * world_size() / split.units(index)
        # backward, piece by piece, gradients accumulating
        pieces = backward_halving_on_oom(model, split, rows, lengths, budget, loss_fn, optimizer, device=device,
                                         dtype=dtype, scaler=scaler, weight=weight)
        # unscale and clip
        finite = unscale_and_clip(optimizer, scaler, params, clip)
        # step: the sums refuse a non-finite loss first; with fp16 the scaler skips a step that overflowed
        sums.add_step(step, pieces, weight, counts, finite, scaler.is_enabled())  # raises Diverged
        scaler.step(optimizer)
        scaler.update()
        # sums: read at once on a CPU, every READ_EVERY steps on CUDA
        if sums.due(step, len(bar)):
            loss = sums.read(step)
            bar.set_postfix(loss=f"{loss:.4f}")
            if on_step:
                on_step(step, loss)
    return sums.totals()


def backward_halving_on_oom(model, split, rows, lengths, budget, loss_fn, optimizer, **kwargs):
    """accumulate_gradients over the budget's pieces of `rows`, from zeroed gradients. If CUDA runs out of memory,
    the budget halves and the step starts again (see PieceBudget)."""
    while True:
        optimizer.zero_grad(set_to_none=True)
        pieces = gradients_unless_out_of_memory(model, split, budget.pieces(rows, lengths), loss_fn, **kwargs)
        if pieces is not None:
            return pieces
        budget.halve(rows, lengths)


def gradients_unless_out_of_memory(*args, **kwargs):
    """accumulate_gradients, or None if CUDA runs out of memory. Returning from outside the handler lets the
    failed attempt's tensors, which its traceback holds, be freed before the retry."""
    try:
        return accumulate_gradients(*args, **kwargs)
    except torch.OutOfMemoryError:
        return None


def accumulate_gradients(model, split, pieces, loss_fn, *, device, dtype, scaler, weight):
    """Backward through each piece of a step's rows; returns [(loss, correct, scored, units, tokens)] per piece,
    the loss and counts as tensors where they were computed."""
    out = []
    for i, piece in enumerate(pieces):
        # Under torchrun gradients are reduced across ranks once per step, after the last piece (setting the flag,
        # as nanoGPT does, spares wrapping each piece in the no_sync() context manager).
        model.require_backward_grad_sync = i == len(pieces) - 1
        ids, lens, labels, teacher = collate(split, piece, device)
        with autocast(device, dtype):
            logits = loss_fn.outputs(model, ids, lens)
        loss, units = loss_fn(logits, labels, teacher), split.units(piece)
        scaler.scale(loss * units * weight).backward()
        out.append((loss.detach(), *loss_fn.counts(logits.detach(), labels), units,
                    sum(len(split.tokens[j]) for j in piece)))
    return out


def unscale_and_clip(optimizer, scaler, params, clip):
    """Unscale the gradients (fp16), clip them to norm `clip` if given; returns whether they are all finite, as a
    tensor on their device (reading it would wait for the GPU)."""
    scaler.unscale_(optimizer)
    grads = [p.grad for p in params if p.grad is not None]
    norm = torch.nn.utils.get_total_norm(grads)
    if clip:
        torch.nn.utils.clip_grads_with_norm_(params, clip, norm)
    return torch.isfinite(norm)


@torch.no_grad()
def predict_logits(model, tokens, *, batch_size, device, dtype):
    """Logits (N, n_classes) for a list of token lists, in their order (batched by length internally).

    Under torchrun the batches are dealt out to the ranks and the logits summed back, so each sentence runs on
    exactly one rank and every rank ends with all of them."""
    was_training = model.training
    model.eval()
    lengths = [len(t) for t in tokens]
    dummy = Split(tokens, torch.zeros(len(tokens), dtype=torch.long))
    out = torch.zeros(len(tokens), model.n_classes)
    for index in sorted_batches(lengths, batch_size)[rank()::world_size()]:
        ids, lens, _, _ = collate(dummy, index, device)
        with autocast(device, dtype):
            out[index] = model(ids, lens).float().cpu()
    model.train(was_training)
    if world_size() > 1:
        import torch.distributed as dist
        out = out.to(device)
        dist.all_reduce(out)
        out = out.cpu()
    return out


def epoch_record(epoch, train, train_seconds, dev, objective):
    """One row of the run's history, from this epoch's training sums (over all ranks: the loss per unit, the
    accuracy over the predictions that have a label) and the dev evaluation, with the objective's epoch_fields."""
    train_loss = train["loss"] / train["units"]
    return {"epoch": epoch, "train_loss": train_loss, "train_acc": train["correct"] / max(1, train["scored"]),
            "dev_loss": dev["loss"], **objective.epoch_fields(train_loss, dev),
            "train_seconds": train_seconds, "train_tokens_per_s": train["tokens"] / train_seconds,
            "skipped_steps": int(train["skipped"])}


def dev_summary(h):
    """An epoch's dev scores as print_epoch shows them: perplexity for a language model, else accuracy and MCC."""
    if "dev_perplexity" in h:
        return f"perplexity {h['dev_perplexity']:.2f} (token acc {h['dev_acc']:.2%}; train {h['train_perplexity']:.2f})"
    return f"acc {h['dev_acc']:.2%} MCC {h['dev_mcc']:+.3f}"


def print_epoch(h, epochs):
    tqdm.write(f"epoch {h['epoch']:>2}/{epochs}  train loss {h['train_loss']:.4f} acc {h['train_acc']:.2%}  |  "
               f"dev loss {h['dev_loss']:.4f} {dev_summary(h)}  "
               f"({h['train_seconds']:.1f}s, {h['train_tokens_per_s']:,.0f} tok/s)"
               + (f"  [{h['skipped_steps']} steps skipped: fp16 gradients overflowed]" if h.get("skipped_steps")
                  else ""))


@contextlib.contextmanager
def stopping_keeps_state(when, saved, state_path):
    """Turn Ctrl-C, SIGTERM and a diverged loss (`when`: "during epoch 2") into one line saying what is on disk."""
    kept = f"the state after epoch {saved} is in {state_path}" if saved else "nothing saved"
    try:
        yield
    except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (utils.Terminated)
        what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
        raise Interrupted(f"{what} {when}; {kept}", interrupt_exit_code(e), resumable=bool(saved)) from None
    except Diverged as e:
        raise Diverged(f"{e} ({kept})") from None


@dataclass(frozen=True)
class TrainConfig:
    """How `fit` trains: Adam at `lr` for `epochs` over batches of `batch_size` sentences drawn from `seed`, on
    `device` in `dtype` (autocast below fp32), gradients clipped to norm `clip` (None: not clipped), each batch cut
    into pieces of at most `micro_batch_tokens` padded tokens (None: whole batches). After every epoch the run's
    state goes to `state_path` (None: nowhere), from which `resume` continues a run saved with the same
    `run_flags` (of a `config_class` configuration) on the same data; `compile` runs the model through
    torch.compile."""
    epochs: int
    batch_size: int
    lr: float
    device: torch.device
    dtype: torch.dtype
    seed: int = 0
    clip: float = None
    micro_batch_tokens: int = None
    state_path: Path = None
    resume: bool = False
    run_flags: dict = None
    compile: bool = False
    config_class: type = None


def fit(model, loss_fn, data, config, watch=None):
    """Train on data['train'] as `config` says, evaluating on data['dev'] after each epoch; the best epoch (the
    highest dev score of the objective `loss_fn`: accuracy, or minus a language model's loss) is restored at the
    end; a non-finite loss, weights or dev loss stops the run (Diverged). `watch` (a runlog.RunWatch) sees every
    step read and every epoch. Returns the run: its id, history, best epoch (0 if none ran) and that epoch's dev
    evaluation.
    On CUDA Adam is fused: one kernel per step, which also lets the fp16 scaler skip a step without a host read."""
    c = config
    optimizer = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=c.lr,
                                 fused=c.device.type == "cuda")
    scaler, budget = loss_scaler(c.device, c.dtype), PieceBudget(c.micro_batch_tokens)
    generator = torch.Generator().manual_seed(c.seed)  # the same on every rank: all draw the same global batches
    fast = compiled(model, c.compile)
    trained = for_all_ranks(fast, c.device)
    run = {"run_id": uuid.uuid4().hex[:12], "epoch": 0, "history": [], "best_epoch": 0, "best_score": -math.inf,
           "best_state": None, "best_dev": None}
    prints = split_fingerprints(data)
    if c.resume:
        run = load_run_state(c.state_path, model, optimizer, scaler, generator, c.run_flags, prints, c.config_class)
        tqdm.write(f"resuming after epoch {run['epoch']} from {c.state_path}")
    saved = run["epoch"] if c.state_path else 0  # the last epoch whose state is on disk
    for epoch in range(run["epoch"] + 1, c.epochs + 1):
        with stopping_keeps_state(f"during epoch {epoch}", saved, c.state_path):
            start = time.perf_counter()
            train = train_epoch(trained, data["train"], loss_fn, optimizer, batch_size=c.batch_size,
                                generator=generator, device=c.device, dtype=c.dtype, clip=c.clip,
                                micro_batch_tokens=budget, scaler=scaler, desc=f"epoch {epoch}/{c.epochs}",
                                on_step=watch.step if watch else None)
            train = dict(zip(train, all_reduce_sum(list(train.values()))))  # summed over ranks
            seconds = time.perf_counter() - start
            dev = loss_fn.evaluate(fast, data["dev"], batch_size=c.batch_size, device=c.device, dtype=c.dtype)
            row = epoch_record(epoch, train, seconds, dev, loss_fn)
            check_finite(model, dev, f"epoch {epoch}/{c.epochs}")  # raises Diverged
            end_epoch(run, epoch, row, dev, model, c.epochs)
            if c.state_path:
                save_state_everywhere(c.state_path, run, model, optimizer, scaler, generator, c.run_flags, prints)
                saved = epoch
        with stopping_keeps_state(f"after epoch {epoch}", saved, c.state_path):
            if watch:
                watch.epoch(run)
    if run["best_state"] is not None:
        model.load_state_dict(run["best_state"], strict=False)
    return run


def check_finite(model, dev, desc):
    """Stop the run if an epoch left non-finite weights or dev loss, though its training losses were finite (a
    single step can do it at a huge --lr): such weights are never kept, saved or counted as the best epoch."""
    trained = [(name, p) for name, p in model.named_parameters() if p.requires_grad]
    finite = torch.stack([torch.isfinite(p).all() for _, p in trained]).tolist()  # one read from the device
    bad = [name for (name, _), ok in zip(trained, finite) if not ok]
    if bad or not math.isfinite(dev["loss"]):
        what = f"the weights ({bad[0]}) became nan or inf" if bad else f"the dev loss became {dev['loss']}"
        raise Diverged(f"{desc}: {what}; try a lower --lr")


def end_epoch(run, epoch, row, dev, model, epochs):
    """Add an epoch's row to the run's history and print it; keep its weights if its dev score is the best."""
    run["history"].append(row)
    print_epoch(row, epochs)
    if dev["score"] > run["best_score"]:
        run.update(best_epoch=epoch, best_score=dev["score"], best_state=trainable_state(model), best_dev=dev)
    run["epoch"] = epoch


def save_state_everywhere(path, run, model, optimizer, scaler, generator, run_flags, prints):
    """The run's state after an epoch, written by rank 0 with every rank's RNG states and the data's fingerprints."""
    rng = rng_states()
    on_main(lambda: save_run_state(path, run, model, optimizer, scaler, generator, run_flags, rng, prints))


def train_config(config, model, device, dtype, out_path):
    """The TrainConfig of a training subcommand's configuration (its train and run sections); the state between
    epochs goes beside `out_path`, saved with the values that decide the run's result."""
    train, options = config.train, config.run
    return TrainConfig(epochs=train.epochs, batch_size=train.batch_size, lr=train.lr, device=device, dtype=dtype,
                       seed=options.seed, clip=train.clip,
                       micro_batch_tokens=train.micro_batch_tokens or default_micro_batch_tokens(
                           device, activation_bytes_per_token(model)),
                       state_path=resume_state_path(out_path), resume=options.resume,
                       run_flags=deciding_values(config, resuming=True), compile=options.compile,
                       config_class=type(config))


def train_and_report(model, objective, splits, config, *, device, dtype, out_path, run_info, extra=None, train=None,
                     trial=None):
    """One run of a training subcommand's `config`, start to finish: train with the shared loop (plots and the
    run's unfinished record after every epoch) on splits['train'], or on `train` when given (distil's training set
    with its transfer sentences), evaluate the best epoch on each evaluation split, calibrate it and print the
    summary; then rank 0 alone writes the model (to `out_path`, with `run_info` and the model card of its record),
    then the finished record (with `extra`), and removes the --resume state. A search's `trial` watches the epochs (see RunWatch). Returns the
    run's record (None on other ranks)."""
    start, loop = time.time(), train_config(config, model, device, dtype, out_path)
    on = dict(batch_size=loop.batch_size, device=device, dtype=dtype)
    watch = RunWatch(config, device, dtype, splits, objective.baseline(model, splits, **on), trial)
    try:
        run = fit(model, objective, splits if train is None else {"train": train, "dev": splits["dev"]}, loop, watch)
    finally:
        watch.close()
    final, s = objective.conclude(model, splits, run, **on)
    objective.print_summary(run_name(config), run, loop.epochs, s, splits)

    def write_results():
        record = watch.final_record(run, model, s, time.time() - start, extra)
        try:  # the model (and its card) first: a record that says finished always has its model
            save_trained(model, out_path, run_info, model_card(read_record(record), record["run_id"], out_path))
        except UserError as e:
            raise UserError(f"{e}; the run's state is kept in {loop.state_path}: once there is room, rerun the "
                            "same command with --resume to save it") from None
        watch.write(record)
        loop.state_path.unlink(missing_ok=True)
        return record

    return on_main(write_results)


def calibrate(model, splits, dev_logits, batch_size, device, dtype):
    """metrics.calibration of a trained model: its temperature fitted on splits['heldout'] (when there is one)."""
    heldout = splits.get("heldout")
    logits = None if heldout is None else predict_logits(model, heldout.tokens, batch_size=batch_size, device=device,
                                                         dtype=dtype)
    return calibration(logits, None if heldout is None else heldout.labels, dev_logits, splits["dev"].labels)
