"""The one training loop and evaluation every mode uses, the losses, the metrics, the plots and the run log.

A mode (LoRA, rnn, distil) supplies a model `model(ids, lengths) -> logits (B, n_classes)` and a loss
`loss_fn(logits, labels, teacher) -> scalar`; nothing else differs.
"""
import contextlib
import math
import statistics
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from tqdm import tqdm

from utils import (EOT, Terminated, UserError, all_reduce_sum, atomic_path, broadcast_from_main, everyone,
                   interrupt_exit_code, is_main, on_main, rank, world_size)


# ----------------------------------------------------------------------------- data

@dataclass
class Split:
    """Tokenized sentences of one CoLA split, with labels and (for distillation) the teacher's logits."""
    tokens: list
    labels: torch.Tensor
    teacher: torch.Tensor = None

    def __len__(self):
        return len(self.tokens)

    def head(self, n):
        teacher = None if self.teacher is None else self.teacher[:n]
        return Split(self.tokens[:n], self.labels[:n], teacher)


def collate(split, index, device):
    """Right-pad the sentences at `index` to the longest of them: (ids, lengths, labels, teacher)."""
    seqs = [split.tokens[i] for i in index]
    lengths = torch.tensor([len(s) for s in seqs])
    ids = torch.full((len(seqs), int(lengths.max())), EOT, dtype=torch.long)
    for row, s in enumerate(seqs):
        ids[row, :len(s)] = torch.tensor(s)
    teacher = None if split.teacher is None else split.teacher[index].to(device)
    return ids.to(device), lengths.to(device), split.labels[index].to(device), teacher


def bucketed_batches(lengths, batch_size, generator, bucket=16):
    """Shuffle, then sort each run of `bucket` batches by length, so a batch holds similar lengths and needs
    little padding; the batches themselves are shuffled again so lengths do not come in order."""
    perm = torch.randperm(len(lengths), generator=generator).tolist()
    batches = []
    for start in range(0, len(perm), batch_size * bucket):
        chunk = sorted(perm[start:start + batch_size * bucket], key=lambda i: lengths[i])
        batches += [chunk[i:i + batch_size] for i in range(0, len(chunk), batch_size)]
    order = torch.randperm(len(batches), generator=generator).tolist()
    return [batches[i] for i in order]


def sorted_batches(lengths, batch_size):
    """Batches for inference: sorted by length (least padding), in a fixed order."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def autocast(device, dtype):
    """Mixed precision for `dtype` lower than fp32, nothing for fp32."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=dtype)


# ----------------------------------------------------------------------------- losses and metrics

def cross_entropy(logits, labels, teacher=None):
    """Supervised loss on the labels alone (LoRA and the no-KD student)."""
    return F.cross_entropy(logits.float(), labels)


def kd_loss(student, teacher, labels, temperature, alpha):
    """Hinton et al.'s distillation loss: alpha * T^2 * KL(softmax(t/T) || softmax(s/T)) + (1 - alpha) * CE(s, y).

    T^2 keeps the soft part's gradients on the scale of the hard part's as T grows.
    """
    T = temperature
    soft = F.kl_div(F.log_softmax(student.float() / T, -1), F.log_softmax(teacher.float() / T, -1),
                    reduction="batchmean", log_target=True)
    hard = F.cross_entropy(student.float(), labels)
    return alpha * T * T * soft + (1 - alpha) * hard


class KDLoss:
    def __init__(self, temperature, alpha):
        self.temperature, self.alpha = temperature, alpha

    def __call__(self, logits, labels, teacher):
        return kd_loss(logits, teacher, labels, self.temperature, self.alpha)


def mcc_rows(preds, labels):
    """MCC of each row of binary predictions against the same row of labels (..., N) -> (...); 0 where a row or
    column of the confusion matrix is empty (e.g. one class only)."""
    p, y = preds.bool(), labels.bool()
    tp, tn = (p & y).sum(-1).double(), (~p & ~y).sum(-1).double()
    fp, fn = (p & ~y).sum(-1).double(), (~p & y).sum(-1).double()
    denom = ((tp + fp) * (tp + fn) * (tn + fp) * (tn + fn)).sqrt()
    return torch.where(denom > 0, (tp * tn - fp * fn) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def matthews_corrcoef(preds, labels):
    """MCC of binary predictions."""
    return float(mcc_rows(torch.as_tensor(preds), torch.as_tensor(labels)))


def wilson_interval(correct, n, level=0.95):
    """Wilson score interval of a proportion correct/n (sound near 0 and 1, unlike the normal approximation)."""
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap_mcc(preds, labels, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of the MCC: resample sentences with replacement (seeded)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(labels), (resamples, len(labels)), generator=g)
    mcc = mcc_rows(preds[idx], labels[idx])
    low, high = torch.quantile(mcc, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double)).tolist()
    return low, high


def mcnemar_exact(correct_a, correct_b):
    """McNemar's exact test on paired per-sentence correctness: (only A right, only B right, two-sided p)."""
    a, b = torch.as_tensor(correct_a).bool(), torch.as_tensor(correct_b).bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return only_a, only_b, p


def scores(preds, labels):
    """Accuracy with its Wilson interval and MCC with its bootstrap interval, for a prediction vector."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    correct = int((preds == labels).sum())
    return {"acc": correct / len(labels), "acc_ci": wilson_interval(correct, len(labels)),
            "mcc": matthews_corrcoef(preds, labels), "mcc_ci": bootstrap_mcc(preds, labels)}


def score_cells(s):
    """Table cells: 'acc% [low, high]' and 'MCC [low, high]'."""
    (al, ah), (ml, mh) = s["acc_ci"], s["mcc_ci"]
    return [f"{s['acc']:.2%} [{al:.1%}, {ah:.1%}]", f"{s['mcc']:+.3f} [{ml:+.2f}, {mh:+.2f}]"]


def majority_label(train_labels):
    """The training set's most common label: always answering it is the baseline (MCC 0)."""
    return int(torch.as_tensor(train_labels).float().mean() >= 0.5)


# ----------------------------------------------------------------------------- the loop

class Diverged(UserError):
    """The loss became NaN or infinite."""


def default_micro_batch_tokens(device):
    """Padded tokens per piece of a batch: 512 on CPU (as fast as larger pieces there, and keeps a gpt2-medium
    run under 3 GB), 16384 on a GPU."""
    return 16384 if device.type == "cuda" else 512


def micro_batches(index, lengths, max_tokens):
    """Cut a batch into consecutive pieces of at most `max_tokens` padded tokens (None: no cut). Gradients are
    accumulated over the pieces, so a step still sees the whole batch while activations stay bounded."""
    if not max_tokens:
        return [index]
    rows = max(1, max_tokens // max(lengths[i] for i in index))
    return [index[i:i + rows] for i in range(0, len(index), rows)]


def rank_share(index):
    """This rank's contiguous share of a global batch, and the weight that makes DDP's gradient average over
    ranks equal the gradient of the whole batch's mean loss. A single process gets the whole batch, weight 1."""
    world = world_size()
    size = -(-len(index) // world)
    share = index[rank() * size:(rank() + 1) * size]
    return share, len(share) * world / len(index)


def train_epoch(model, split, loss_fn, optimizer, *, batch_size, generator, device, dtype, clip=None,
                micro_batch_tokens=None, desc="train"):
    """One pass over `split` in length-bucketed batches; returns mean loss, accuracy and real tokens seen.

    Under torchrun `model` is DistributedDataParallel: every rank draws the same global batches and trains on its
    share of each, and gradients are reduced once per step (after the last piece)."""
    model.train()
    params = [p for g in optimizer.param_groups for p in g["params"]]
    lengths = [len(t) for t in split.tokens]
    total_loss, correct, tokens = 0.0, 0, 0
    batches = bucketed_batches(lengths, batch_size, generator)
    # disable=None: a bar on a terminal, none in logs and CI (and on ranks other than 0)
    bar = tqdm(batches, desc=desc, leave=False, dynamic_ncols=True, disable=None if is_main() else True)
    for step, index in enumerate(bar, start=1):
        optimizer.zero_grad(set_to_none=True)
        share, weight = rank_share(index)
        pieces = micro_batches(share or index[:1], lengths, micro_batch_tokens)  # an empty share still syncs
        batch_loss, bad = 0.0, None
        for i, piece in enumerate(pieces):
            ids, lens, labels, teacher = collate(split, piece, device)
            sync = i == len(pieces) - 1 or not hasattr(model, "no_sync")
            with contextlib.nullcontext() if sync else model.no_sync():
                with autocast(device, dtype):
                    logits = model(ids, lens)
                loss = loss_fn(logits, labels, teacher) * (len(piece) / len(share) if share else 0.0)
                (loss * weight).backward()  # the losses are batch means: weight the pieces and shares
            if bad is None and not torch.isfinite(loss):
                bad = loss.item()
            batch_loss += loss.item() * weight / world_size()
            if share:
                correct += int((logits.argmax(-1) == labels).sum())
                tokens += int(lens.sum())
        if not everyone(bad is None):  # decided together, so that no rank is left waiting for the others
            raise Diverged(f"{desc}: loss became {'nan' if bad is None else bad} at step {step}; try a lower --lr")
        if clip:
            torch.nn.utils.clip_grad_norm_(params, clip)
        optimizer.step()
        total_loss += batch_loss * len(index)
        bar.set_postfix(loss=f"{batch_loss:.4f}")
    total_loss, correct, tokens = all_reduce_sum([total_loss, correct, tokens])
    return {"loss": total_loss / len(split), "acc": correct / len(split), "tokens": int(tokens)}


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


def evaluate(model, split, loss_fn, *, batch_size, device, dtype):
    """Loss, accuracy, MCC, predictions (in split order) and inference speed on a labelled split."""
    start = time.perf_counter()
    logits = predict_logits(model, split.tokens, batch_size=batch_size, device=device, dtype=dtype)
    seconds = time.perf_counter() - start
    preds = logits.argmax(-1)
    return {"loss": float(loss_fn(logits, split.labels, split.teacher)),
            "acc": float((preds == split.labels).float().mean()),
            "mcc": matthews_corrcoef(preds, split.labels),
            "sentences_per_s": len(split) / seconds,
            "preds": preds.tolist()}


def trainable_state(model):
    return {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}


class Interrupted(UserError):
    """A run stopped by Ctrl-C or SIGTERM, with the exit code the signal calls for."""

    def __init__(self, message, exit_code):
        super().__init__(message)
        self.exit_code = exit_code


def rng_states():
    """Every rank's RNG states (dropout draws differ per rank), gathered on all ranks."""
    import torch.distributed as dist
    mine = {"cpu": torch.get_rng_state(), "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}
    if not dist.is_initialized():
        return [mine]
    everyone_states = [None] * world_size()
    dist.all_gather_object(everyone_states, mine)
    return everyone_states


def save_run_state(path, run, model, optimizer, generator, config, rng):
    """Everything needed to continue after the last finished epoch, written atomically."""
    state = dict(run, model=trainable_state(model), optimizer=optimizer.state_dict(), generator=generator.get_state(),
                 rng=rng, config=config)
    with atomic_path(path) as tmp:
        torch.save(state, tmp)


def read_run_state(path, config):
    """A saved run, refusing one made with other flags."""
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
                        "rerun with the same flags, or without --resume")
    if len(state["rng"]) != world_size():
        raise UserError(f"{path}: saved by {len(state['rng'])} processes, resumed by {world_size()}")
    return state


def load_run_state(path, model, optimizer, generator, config):
    """Restore a run saved by save_run_state. Rank 0 reads the file and every rank gets its content (or the
    same error), so several machines need not share a disk."""
    state, error = None, None
    if is_main():
        try:
            state = read_run_state(path, config)
        except UserError as e:
            error = str(e)
    state, error = broadcast_from_main((state, error))
    if error:
        raise UserError(error)
    model.load_state_dict(state["model"], strict=False)
    optimizer.load_state_dict(state["optimizer"])
    generator.set_state(state["generator"])
    torch.set_rng_state(state["rng"][rank()]["cpu"])
    if state["rng"][rank()]["cuda"]:
        torch.cuda.set_rng_state_all(state["rng"][rank()]["cuda"])
    return {k: state[k] for k in ("epoch", "history", "best_epoch", "best_acc", "best_state", "best_dev")}


def fit(model, loss_fn, data, *, epochs, batch_size, lr, device, dtype, seed, clip=None, micro_batch_tokens=None,
        state_path=None, resume=False, config=None):
    """Train for `epochs` with Adam, evaluating on data['dev'] after each; the best epoch (dev accuracy) is
    restored at the end. After each epoch the run's state goes to `state_path`, from which `resume` continues
    exactly. Returns the per-epoch history, the best epoch (0 if none ran) and its dev evaluation."""
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.Adam(params, lr=lr)
    generator = torch.Generator().manual_seed(seed)  # the same on every rank: all draw the same global batches
    trained = model
    if world_size() > 1:  # under torchrun; gradients of the trainable parameters are averaged across ranks
        from torch.nn.parallel import DistributedDataParallel
        trained = DistributedDataParallel(model, device_ids=[torch.cuda.current_device()] if device.type == "cuda"
                                          else None)
    run = {"epoch": 0, "history": [], "best_epoch": 0, "best_acc": -1.0, "best_state": None, "best_dev": None}
    if resume:
        run = load_run_state(state_path, model, optimizer, generator, config)
        tqdm.write(f"resuming after epoch {run['epoch']} from {state_path}")
    saved = run["epoch"] if state_path else 0  # the last epoch whose state is on disk
    for epoch in range(run["epoch"] + 1, epochs + 1):
        kept = f"the state after epoch {saved} is in {state_path}" if saved else "nothing saved"
        start = time.perf_counter()
        try:
            train = train_epoch(trained, data["train"], loss_fn, optimizer, batch_size=batch_size, generator=generator,
                                device=device, dtype=dtype, clip=clip, micro_batch_tokens=micro_batch_tokens,
                                desc=f"epoch {epoch}/{epochs}")
            train_seconds = time.perf_counter() - start
            dev = evaluate(model, data["dev"], loss_fn, batch_size=batch_size, device=device, dtype=dtype)
            run["history"].append({"epoch": epoch, "train_loss": train["loss"], "train_acc": train["acc"],
                                   "dev_loss": dev["loss"], "dev_acc": dev["acc"], "dev_mcc": dev["mcc"],
                                   "train_seconds": train_seconds,
                                   "train_tokens_per_s": train["tokens"] / train_seconds})
            tqdm.write(f"epoch {epoch:>2}/{epochs}  train loss {train['loss']:.4f} acc {train['acc']:.2%}  |  "
                       f"dev loss {dev['loss']:.4f} acc {dev['acc']:.2%} MCC {dev['mcc']:+.3f}  "
                       f"({train_seconds:.1f}s, {train['tokens'] / train_seconds:,.0f} tok/s)")
            if dev["acc"] > run["best_acc"]:
                run.update(best_epoch=epoch, best_acc=dev["acc"], best_state=trainable_state(model), best_dev=dev)
            run["epoch"] = epoch
            if state_path:
                rng = rng_states()
                on_main(lambda: save_run_state(state_path, run, model, optimizer, generator, config, rng))
                saved = epoch
        except KeyboardInterrupt as e:  # Ctrl-C, or SIGTERM (utils.Terminated)
            what = "terminated (SIGTERM)" if isinstance(e, Terminated) else "interrupted"
            hint = "; rerun the same command with --resume to continue" if saved else ""
            raise Interrupted(f"{what} during epoch {epoch}; {kept}{hint}", interrupt_exit_code(e)) from None
        except Diverged as e:
            raise Diverged(f"{e} ({kept})") from None
    if run["best_state"] is not None:
        model.load_state_dict(run["best_state"], strict=False)
    return run["history"], run["best_epoch"], run["best_dev"]


# ----------------------------------------------------------------------------- reporting

def format_table(headers, rows):
    """A plain-text table with right-aligned columns."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_history(history, mode, baseline_acc, best_acc_ci=None, plots_dir="plots"):
    """plots/<mode>_loss.png and plots/<mode>_acc.png: train vs validation per epoch, majority baseline drawn,
    and the best epoch's 95% interval as an error bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    paths = []
    for metric, label in (("loss", "loss"), ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"dev_{metric}"] for h in history], "s-", label="validation (in-domain dev)")
        if metric == "acc":
            ax.axhline(baseline_acc, color="gray", linestyle="--", label=f"majority baseline ({baseline_acc:.2%})")
            best = max(history, key=lambda h: h["dev_acc"])
            if best_acc_ci:
                low, high = best_acc_ci
                acc = best["dev_acc"]
                ax.errorbar([best["epoch"]], [acc], yerr=[[acc - low], [high - acc]], fmt="none", ecolor="black",
                            capsize=4, label="best epoch, 95% Wilson interval")
            ax.annotate(f"MCC {best['dev_mcc']:+.3f}", (best["epoch"], best["dev_acc"]),
                        textcoords="offset points", xytext=(8, 8), ha="left")
        ax.set(title=f"{mode}: {label} per epoch", xlabel="epoch", ylabel=label)
        ax.set_xticks(epochs)
        ax.legend()
        path = f"{plots_dir}/{mode}_{metric}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_summary(entries, plots_dir="plots"):
    """plots/summary.png: accuracy and MCC with 95% intervals per model, and parameters and inference speed."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [e["name"].replace(" (", "\n(") for e in entries]
    x = torch.arange(len(entries)).float()
    fig, (ax, size) = plt.subplots(1, 2, figsize=(13, 4.5))
    for offset, metric, label in ((-0.2, "acc", "dev accuracy"), (0.2, "mcc", "dev MCC")):
        values = [e["scores"][metric] for e in entries]
        low = [v - e["scores"][f"{metric}_ci"][0] for v, e in zip(values, entries)]
        high = [e["scores"][f"{metric}_ci"][1] - v for v, e in zip(values, entries)]
        ax.bar(x + offset, values, width=0.4, yerr=[low, high], capsize=4, label=label)
    ax.set_xticks(x, names, fontsize=8)
    ax.set(title="in-domain dev: accuracy and MCC (95% intervals)", ylim=(min(0, ax.get_ylim()[0]), 1))
    ax.legend()
    measured = [i for i, e in enumerate(entries) if e["params"]]
    size.bar(x[measured], [entries[i]["params"] / 1e6 for i in measured], color="tab:gray", label="parameters (M)")
    size.set(yscale="log", ylabel="parameters (millions)", title="size and inference speed")
    size.set_xticks(x, names, fontsize=8)
    speed = size.twinx()
    speed.plot(x[measured], [entries[i]["speed"] for i in measured], "o-", color="tab:red")
    speed.set(yscale="log", ylabel="sentences / s (dev set, this machine)")
    speed.yaxis.label.set_color("tab:red")
    path = f"{plots_dir}/summary.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_grid(labels, configs, baseline_acc, path):
    """A sweep: dev accuracy and MCC per configuration, mean with error bars of one standard deviation over seeds."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (acc, mcc) = plt.subplots(2, 1, figsize=(max(6, 1.2 * len(configs)), 7), sharex=True)
    x = list(range(len(configs)))
    acc.errorbar(x, [c["dev_acc"][0] for c in configs], yerr=[c["dev_acc"][1] for c in configs], fmt="o", capsize=4)
    acc.axhline(baseline_acc, color="gray", linestyle="--", label=f"majority baseline ({baseline_acc:.2%})")
    acc.set(ylabel="dev accuracy", title="sweep: mean ± std over seeds")
    acc.legend()
    mcc.errorbar(x, [c["dev_mcc"][0] for c in configs], yerr=[c["dev_mcc"][1] for c in configs], fmt="s",
                 color="tab:orange", capsize=4)
    mcc.axhline(0, color="gray", linestyle="--")
    mcc.set(ylabel="dev MCC")
    mcc.set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path
