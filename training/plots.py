"""The plots a run draws: per-epoch curves, the distillation summary and reliability diagram, a sweep's and a
search's results."""
import torch

from textdata.readers import run_stem
from training.metrics import ECE_BINS, reliability_bins, wilson_interval
from utils import PLOTS_DIR, atomic_path


def save_figure(fig, path):
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=120, bbox_inches="tight")


def plot_history(history, mode, splits, baseline, best_acc_ci=None, plots_dir="plots"):
    """plots/<mode>_loss.png and plots/<mode>_acc.png (<mode>-<dataset>_... past CoLA): train vs validation per
    epoch, majority baseline drawn, and the best epoch's 95% interval as an error bar. A language model's second
    plot is its dev perplexity (<mode>..._perplexity.png), beside the base model's before training (`baseline`)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    epochs = [h["epoch"] for h in history]
    lm = splits.task == "lm"
    paths = []
    for metric, label in (("loss", "loss"), ("perplexity", "perplexity") if lm else ("acc", "accuracy")):
        fig, ax = plt.subplots(figsize=(6, 4))
        if metric != "perplexity":  # training has no perplexity of its own: its loss is over dropout's model
            ax.plot(epochs, [h[f"train_{metric}"] for h in history], "o-", label="train")
        ax.plot(epochs, [h[f"dev_{metric}"] for h in history], "s-", label=f"validation ({splits.titles['dev']})")
        if metric == "perplexity":  # on a log scale: training moves it by orders of magnitude
            ax.axhline(baseline, color="gray", linestyle="--", label=f"base model, untrained ({baseline:.2f})")
            ax.set_yscale("log")
        elif metric == "acc":
            ax.axhline(baseline, color="gray", linestyle="--", label=f"majority baseline ({baseline:.2%})")
            best = max(history, key=lambda h: h["dev_acc"])
            if best_acc_ci:
                low, high = best_acc_ci
                acc = best["dev_acc"]
                ax.errorbar([best["epoch"]], [acc], yerr=[[acc - low], [high - acc]], fmt="none", ecolor="black",
                            capsize=4, label="best epoch, 95% Wilson interval")
            ax.annotate(f"MCC {best['dev_mcc']:+.3f}", (best["epoch"], best["dev_acc"]),
                        textcoords="offset points", xytext=(8, 8), ha="left")
        ax.set(title=f"{mode} on {splits.spec.name}: {label} per epoch", xlabel="epoch", ylabel=label)
        ax.set_xticks(epochs)
        ax.legend()
        path = f"{plots_dir}/{run_stem(mode, splits.spec)}_{metric}.png"
        save_figure(fig, path)
        plt.close(fig)
        paths.append(path)
    return paths


def draw_history(run, mode, splits, baseline):
    """plots/<mode>_loss.png and _acc.png (<mode>-<dataset>_... past CoLA; a language model's _perplexity.png) for
    the epochs so far, a classifier's best one with its 95% Wilson interval."""
    n = len(splits["dev"])
    best_ci = None if splits.task == "lm" else wilson_interval(round(run["best_score"] * n), n)
    return plot_history(run["history"], mode, splits, baseline, best_ci, PLOTS_DIR)


def plot_summary(entries, splits, plots_dir="plots", transfer=None):
    """plots/summary.png (summary-<dataset>.png past CoLA): accuracy and MCC with 95% intervals and the ECE per
    model, and parameters and inference speed; the transfer set's size and the teacher's labels on it, if any."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    names = [e["name"].replace(" (", "\n(") for e in entries]
    x = torch.arange(len(entries)).float()
    fig, (ax, size) = plt.subplots(1, 2, figsize=(13, 4.5))
    for offset, metric, label in ((-0.27, "acc", "dev accuracy"), (0.0, "mcc", "dev MCC")):
        values = [e["scores"][metric] for e in entries]
        low = [v - e["scores"][f"{metric}_ci"][0] for v, e in zip(values, entries)]
        high = [e["scores"][f"{metric}_ci"][1] - v for v, e in zip(values, entries)]
        ax.bar(x + offset, values, width=0.27, yerr=[low, high], capsize=4, label=label)
    ece = [i for i, e in enumerate(entries) if e.get("calibration")]
    ax.bar(x[ece] + 0.27, [entries[i]["calibration"]["ece"] for i in ece], width=0.27, label="dev ECE")
    ax.set_xticks(x, names, fontsize=8)
    ax.set(title=f"{splits.spec.name}, {splits.titles['dev']}: accuracy and MCC (95% intervals)",
           ylim=(min(0, ax.get_ylim()[0]), 1))
    ax.legend()
    measured = [i for i, e in enumerate(entries) if e["params"]]
    size.bar(x[measured], [entries[i]["params"] / 1e6 for i in measured], color="tab:gray", label="parameters (M)")
    size.set(yscale="log", ylabel="parameters (millions)", title="size and inference speed")
    size.set_xticks(x, names, fontsize=8)
    speed = size.twinx()
    speed.plot(x[measured], [entries[i]["speed"] for i in measured], "o-", color="tab:red")
    speed.set(yscale="log", ylabel="sentences / s (dev set, this machine)")
    speed.yaxis.label.set_color("tab:red")
    if transfer:
        counts = transfer.get("teacher_labels") or []
        balance = ", ".join(f"{c / max(1, sum(counts)):.0%} {name}" for name, c in zip(splits.labels, counts))
        fig.suptitle(f"transfer set: {transfer['size']:,} sentences; the teacher labels them {balance}", fontsize=9)
    path = f"{plots_dir}/{run_stem('summary', splits.spec)}.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_calibration(entries, splits, plots_dir="plots"):
    """plots/calibration.png (calibration-<dataset>.png past CoLA): the reliability diagram, accuracy against
    confidence per ECE bin for each model with dev probabilities; the diagonal is perfect calibration."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, ax = plt.subplots(figsize=(6, 5))
    ax.plot([0, 1], [0, 1], color="gray", linestyle="--", label="perfectly calibrated")
    for e in entries:
        if e.get("probs") is None:
            continue
        count, conf, acc = reliability_bins(e["probs"], splits["dev"].labels)
        used = count > 0
        ax.plot(conf[used], acc[used], "o-", label=f"{e['name']} (ECE {e['calibration']['ece']:.3f})")
    ax.set(xlabel="confidence (top probability)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1),
           title=f"{splits.spec.name}, {splits.titles['dev']}: reliability ({ECE_BINS} bins)")
    ax.legend(fontsize=7)
    path = f"{plots_dir}/{run_stem('calibration', splits.spec)}.png"
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_grid(labels, configs, panels, path):
    """A sweep: one panel per metric, its mean per configuration with error bars of one standard deviation over
    seeds, beside a reference line. `panels`: [(metric, axis label, reference value, the reference's label)]."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, axes = plt.subplots(len(panels), 1, figsize=(max(6, 1.2 * len(configs)), 3.5 * len(panels)), sharex=True,
                             squeeze=False)
    x = list(range(len(configs)))
    for ax, (metric, label, reference, about), (marker, color) in zip(axes[:, 0], panels, (("o", None),
                                                                                         ("s", "tab:orange"))):
        ax.errorbar(x, [c[metric][0] for c in configs], yerr=[c[metric][1] for c in configs], fmt=marker,
                    color=color, capsize=4)
        ax.axhline(reference, color="gray", linestyle="--", label=about)
        ax.set(ylabel=label)
        ax.legend()
    axes[0, 0].set(title="sweep: mean ± std over seeds")
    axes[-1, 0].set_xticks(x, labels, rotation=30, ha="right", fontsize=8)
    save_figure(fig, path)
    plt.close(fig)
    return path


def plot_search(history, importances, title, direction, path):
    """A search: each complete trial's score by trial number with the best so far, and each flag's importance."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    fig, (runs, weight) = plt.subplots(1, 2, figsize=(12, 4.5))
    numbers, values = zip(*history)
    better = max if direction == "maximize" else min
    runs.plot(numbers, values, "o", label="complete trial")
    runs.step(numbers, [better(values[:i + 1]) for i in range(len(values))], where="post", color="tab:red",
              label="best so far")
    runs.set(xlabel="trial", ylabel=f"mean {title} over seeds", title="optimisation history")
    runs.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    runs.legend()
    if importances:
        names = list(importances)[::-1]  # the most important on top
        weight.barh(names, [importances[n] for n in names], color="tab:green")
        weight.set(xlabel="importance (fANOVA)", title=f"what {title} depends on")
    else:
        weight.text(0.5, 0.5, "importance needs two complete trials", ha="center", va="center")
        weight.set_axis_off()
    save_figure(fig, path)
    plt.close(fig)
    return path
