"""`python run.py tune`: a sweep over seeds and a grid of flags of LoRA, rnn or distil, each run exactly the plain
subcommand's, logged as usual; then the summary (mean and spread over seeds, the best, McNemar's test) and its plot.
The planning and checking of a sweep's runs here serve search.py's Optuna search too."""
from concurrent.futures import ThreadPoolExecutor
from dataclasses import fields
import itertools
import os
from pathlib import Path
import shlex
import signal
import statistics
import subprocess
import sys
import threading

import torch

from cli.parser import command_line, typed_values
from config.fields import build, deciding_values
from config.records import read_records
from config.subcommands import SUBCOMMANDS
from textdata.readers import DataSpec, load_text_data, run_stem
from train_utils import Interrupted
from training.distil_report import latest_matching_rnn_run
from training.metrics import mcnemar_exact
from training.plots import plot_grid
from training.resume_state import resume_state_path
from utils import PLOTS_DIR, TUNING_DIR, Terminated, UsageError, UserError, safe_name, write_text

RUN_PY = Path(__file__).resolve().parent.parent / "run.py"


def output_flag(target):
    return "student_path" if target == "distil" else "model_path"


def check_varied_flag(option, item, flag, target, seen):
    """A flag a sweep varies (`--grid` or `--space` entry `item`) must be given once and be one the sweep does not
    set itself: the seed (--seeds), the output folder (one per run), a data flag (one sweep per dataset)."""
    fixed = {"seed": "use --seeds", output_flag(target): "each run writes under models/tune/<name>/"} | {
        f.name: "run one sweep per dataset" for f in fields(DataSpec)}
    if flag in seen:
        raise UsageError(f"{option} {item}: {flag} is given twice")
    if flag in fixed:
        raise UsageError(f"{option} {item}: {flag} cannot vary in a sweep ({fixed[flag]})")


def check_sweep_command(tune, rest):
    """What every sweep refuses in the flags passed to its runs: the seed and the output folder it sets itself,
    and a seed given twice in --seeds."""
    out_flag = f"--{output_flag(tune.target)}"
    reasons = {"--seed": "use --seeds", out_flag: "each run writes under models/tune/<name>/"}
    given = [flag for flag in reasons if any(a == flag or a.startswith(flag + "=") for a in rest)]
    if given:
        raise UsageError(f"tune: {given[0]} is set by the sweep ({reasons[given[0]]})")
    if len(set(tune.seeds)) < len(tune.seeds):
        raise UsageError(f"--seeds {' '.join(map(str, tune.seeds))}: a seed is given twice")


def sweep_base(parser, tune, rest):
    """The flag values every run of a sweep shares: the target subcommand's command line `rest` (less --resume,
    which the sweep decides per run), read once by its parser; a value not given is None, so that a default that
    follows another flag follows it in each run."""
    values = vars(parser.parse_args([tune.target, *[a for a in rest if a != "--resume"]]))
    return {k: v for k, v in values.items() if k != "mode"}


def planned_run(tune, base, name, config, seed):
    """One run of a sweep: the target subcommand's configuration of the shared flags `base` and the grid's (or a
    trial's) `config` ({flag: text}), with its own output folder and seed, validated as run.py validates a
    command. A run an earlier sweep left interrupted continues from its last epoch (--restart: starts over)."""
    cls = SUBCOMMANDS[tune.target]
    folder = f"models/tune/{name}/{safe_name(config_label(config))}_seed{seed}"
    resume = not tune.restart and resume_state_path(folder).exists()
    run = build(cls, base | typed_values(cls, config) | {output_flag(tune.target): folder, "seed": seed,
                                                        "resume": resume})
    run.validate()
    if run.train.epochs < 1:
        raise UsageError(f"tune: --epochs {run.train.epochs}: a sweep trains, at least 1 epoch")
    return {"config": config, "seed": seed, "run": run}


def tune_plan(parser, tune, rest):
    """(name, grid, plan): every (configuration, seed) run of a sweep, each run's configuration made and validated
    before any run starts.

    Each run is the target subcommand's configuration of its command line plus --seed and the grid's flags, so a
    sweep run is exactly the plain subcommand's run, and a logged run of the same configuration counts as done."""
    grid = {}
    for item in tune.grid:
        flag, _, values = item.partition("=")
        flag = flag.lstrip("-")
        if not flag or not values:
            raise UsageError(f"--grid {item}: expected flag=value[,value...], e.g. temperature=1,2,4")
        check_varied_flag("--grid", item, flag, tune.target, grid)
        grid[flag] = values.split(",")
    check_sweep_command(tune, rest)
    base = sweep_base(parser, tune, rest)
    spec = build(SUBCOMMANDS[tune.target], base).data
    name = tune.name or "_".join([run_stem(tune.target, spec)] + [f"{k}-{'-'.join(v)}" for k, v in grid.items()])
    name = safe_name(name)
    plan = [planned_run(tune, base, name, dict(zip(grid, values)), seed)
            for values in itertools.product(*grid.values()) for seed in tune.seeds]
    return name, grid, plan


def logged_run(run, records):
    """The logged record of a planned run (the same values decide its result, --epochs included), if any."""
    wanted = deciding_values(run["run"])
    matches = [r for r in records if r.finished  # a run stopped midway is not done
               and deciding_values(r.config) == wanted]
    return matches[-1] if matches else None


def sweep(tune, plan_of_sweep, execute, argv):
    """Run a sweep (configurations x seeds), skipping runs already logged, then summarize it. `plan_of_sweep` is
    tune_plan's result; `execute(run_config)` runs one planned run in this process. Stopped by Ctrl-C or SIGTERM, it
    says which command continues it: `argv`, the sweep's own command line, less --restart."""
    try:
        run_sweep(tune, plan_of_sweep, execute)
    except (KeyboardInterrupt, Interrupted) as e:
        what = e.what if isinstance(e, Interrupted) else "terminated (SIGTERM)" if isinstance(e, Terminated) \
            else "interrupted"
        command = "python run.py " + shlex.join(a for a in argv if a != "--restart")
        raise Interrupted(f"{what}; rerun `{command}` to continue: the finished runs are skipped, the interrupted "
                          "ones resume from their last saved epoch", getattr(e, "exit_code", 130)) from None


def run_sweep(tune, plan_of_sweep, execute):
    name, grid, plan = plan_of_sweep
    log = f"{TUNING_DIR}/{run_stem(tune.target, plan[0]['run'].data)}.jsonl"
    pending = []
    for i, run in enumerate(plan, start=1):
        label = f"{config_label(run['config'])} seed={run['seed']}"
        if logged_run(run, read_records(log)):
            print(f"[{i}/{len(plan)}] {label}: already in {log}, skipped")
        else:
            pending.append((label, run))
    if tune.parallel > 1:
        run_side_by_side([(label, command_line(run["run"])) for label, run in pending], tune.parallel,
                         Path(TUNING_DIR) / f"{name}-logs")
    for label, run in [] if tune.parallel > 1 else pending:
        print(f"\n[{plan.index(run) + 1}/{len(plan)}] {tune.target} {label}")
        execute(run["run"])
    summarize_tune(name, tune.target, grid, plan)


def slot_gpu(slot):
    """The environment that gives a side-by-side slot one GPU of those visible (CUDA_VISIBLE_DEVICES, if set),
    taken in turn when there are more slots than GPUs; nothing without CUDA."""
    if not torch.cuda.is_available():
        return {}
    visible = os.environ.get("CUDA_VISIBLE_DEVICES")
    gpus = visible.split(",") if visible else [str(i) for i in range(torch.cuda.device_count())]
    return {"CUDA_VISIBLE_DEVICES": gpus[slot % len(gpus)]}


def run_side_by_side(pending, slots, log_dir):
    """Run the pending sweep runs ([(label, the flags after run.py)]) as separate processes, `slots` at a time, each slot on its own GPU when there
    are GPUs; each run's output goes to log_dir/<n>.log. Ctrl-C or SIGTERM is passed on to the running ones, which
    stop as a plain run does (resume state kept), and no further run starts. A run's log is named after its
    configuration and seed, so a rerun overwrites only the same run's log."""
    log_dir.mkdir(parents=True, exist_ok=True)
    running, lock, stopping = {}, threading.Lock(), threading.Event()

    def worker(slot):
        env = os.environ | slot_gpu(slot)
        for n, (label, argv) in list(enumerate(pending))[slot::slots]:
            with lock:  # a run not started once the sweep is stopping keeps its earlier log
                if stopping.is_set():
                    return
                log = open(log_dir / f"{safe_name(label)}.log", "w")
                running[n] = subprocess.Popen([sys.executable, str(RUN_PY), *argv], env=env, stdout=log,
                                              stderr=subprocess.STDOUT)
            with log:
                code = running[n].wait()
            print(f"{label}: {'done' if code == 0 else f'FAILED (exit {code}), see {log.name}'}", flush=True)

    with ThreadPoolExecutor(slots) as pool:
        try:
            list(pool.map(worker, range(slots)))
        except KeyboardInterrupt as e:
            with lock:
                stopping.set()
                for proc in running.values():
                    if proc.poll() is None:
                        proc.send_signal(signal.SIGTERM if isinstance(e, Terminated) else signal.SIGINT)
            raise


def is_lm(config):
    """Whether a run's configuration trains a language model (LoRA --task lm)."""
    return getattr(getattr(config, "lora", None), "task", None) == "lm"


def config_label(config):
    return ", ".join(f"{k}={v}" for k, v in config.items())


def config_stats(name, grid, plan, records, metrics):
    """Per configuration of the grid: its logged runs and the mean and standard deviation of each metric over them."""
    configs = []
    for config in [dict(zip(grid, v)) for v in itertools.product(*grid.values())]:
        runs = [logged_run(run, records) for run in plan if run["config"] == config]
        runs = [r for r in runs if r is not None]
        if not runs:
            raise UserError(f"sweep {name}: no finished run of {config_label(config)}; see the messages above")
        stats = {m: (statistics.mean(r[m] for r in runs),
                     statistics.stdev(r[m] for r in runs) if len(runs) > 1 else 0.0) for m in metrics}
        configs.append({"config": config, "runs": runs, **stats})
    return configs


def mcnemar_lines(best, target, labels):
    """McNemar's exact test of the best configuration's runs against the no-KD student or the majority class."""
    lines = []
    for r in best["runs"]:
        nokd = latest_matching_rnn_run(r) if target == "distil" else None
        baseline = nokd["dev_preds"] if nokd else [r["majority_label"]] * len(r["dev_preds"])
        only_best, only_base, p = mcnemar_exact(torch.tensor(r["dev_preds"]) == labels,
                                                torch.tensor(baseline) == labels)
        lines.append(f"- seed {r.config.run.seed}: vs {'the no-KD student' if nokd else 'the majority class'}: "
                     f"{only_best} / {only_base}, p = {p:.3g}")
    return lines


def summarize_tune(name, target, grid, plan):
    """tuning/<name>.md and plots/tune_<name>.png: mean ± std over seeds per configuration, the best one, and
    McNemar's test of the best against the baseline (the no-KD student for distil, else the majority class). The
    second evaluation's column is there when the dataset has one (CoLA's out-of-domain dev)."""
    spec = plan[0]["run"].data
    if is_lm(plan[0]["run"]):
        return summarize_lm_tune(name, target, grid, plan, spec)
    data = load_text_data(spec)
    second = "out-of-domain" if spec.is_cola else data.titles["ood"] if "ood" in data.splits else None
    configs = config_stats(name, grid, plan, read_records(f"{TUNING_DIR}/{run_stem(target, spec)}.jsonl"),
                           ("dev_acc", "dev_mcc") + (("ood_acc",) if second else ()))
    best = max(configs, key=lambda c: c["dev_acc"][0])
    labels = torch.tensor(data.splits["dev"][1])
    on = "" if spec.is_cola else f" on {spec.name}"
    lines = [f"# Sweep `{name}` ({target}{on})", "",
             f"Mean ± standard deviation over seeds {sorted({run['seed'] for run in plan})}. Majority baseline: "
             f"{best['runs'][0]['baseline_dev_acc']:.2%} dev accuracy, MCC 0; one dev-accuracy point is about "
             f"{len(labels) / 100:.0f} sentences.", "",
             "| configuration | seeds | dev accuracy | dev MCC |" + (f" {second} accuracy |" if second else ""),
             "|---|---|---|---|" + ("---|" if second else "")]
    for c in configs:
        (acc, acc_sd), (mcc, mcc_sd) = c["dev_acc"], c["dev_mcc"]
        ood = f" {c['ood_acc'][0]:.2%} ± {c['ood_acc'][1]:.2%} |" if second else ""
        lines.append(f"| {config_label(c['config'])} | {len(c['runs'])} | {acc:.2%} ± {acc_sd:.2%} | "
                     f"{mcc:+.3f} ± {mcc_sd:.3f} |{ood}")
    lines += ["", f"Best by mean dev accuracy: **{config_label(best['config'])}**.", "",
              "McNemar's exact test of the best configuration against the baseline, per seed (sentences right only "
              "with the best / only with the baseline; a small p says the difference is unlikely to be chance):", "",
              *mcnemar_lines(best, target, labels)]
    majority = best["runs"][0]["baseline_dev_acc"]
    panels = [("dev_acc", "dev accuracy", majority, f"majority baseline ({majority:.2%})"), ("dev_mcc", "dev MCC", 0,
              "majority baseline (MCC 0)")]
    write_sweep(name, lines, plot_grid([config_label(c["config"]) for c in configs], configs, panels,
                                       f"{PLOTS_DIR}/tune_{name}.png"))


def write_sweep(name, lines, plot):
    text = "\n".join(lines) + "\n"
    write_text(f"{TUNING_DIR}/{name}.md", text)
    print("\n" + text + f"\nsummary: {TUNING_DIR}/{name}.md; plot: {plot}")


def summarize_lm_tune(name, target, grid, plan, spec):
    """tuning/<name>.md and plots/tune_<name>.png of a sweep of language models: mean ± std over seeds of dev
    perplexity (lower is better) and token accuracy per configuration, beside the base model's before training."""
    configs = config_stats(name, grid, plan, read_records(f"{TUNING_DIR}/{run_stem(target, spec)}.jsonl"),
                           ("dev_perplexity", "dev_acc"))
    best = min(configs, key=lambda c: c["dev_perplexity"][0])
    base = {k: best["runs"][0][f"baseline_dev_{k}"] for k in ("perplexity", "acc")}
    on = "" if spec.is_cola else f" on {spec.name}"
    lines = [f"# Sweep `{name}` ({target} --task lm{on})", "",
             f"Mean ± standard deviation over seeds {sorted({run['seed'] for run in plan})}. The base model, "
             f"untrained: {base['perplexity']:.2f} dev perplexity, {base['acc']:.2%} token accuracy.", "",
             "| configuration | seeds | dev perplexity | dev token accuracy |", "|---|---|---|---|"]
    for c in configs:
        (ppl, ppl_sd), (acc, acc_sd) = c["dev_perplexity"], c["dev_acc"]
        lines.append(f"| {config_label(c['config'])} | {len(c['runs'])} | {ppl:.2f} ± {ppl_sd:.2f} | "
                     f"{acc:.2%} ± {acc_sd:.2%} |")
    lines += ["", f"Best by mean dev perplexity: **{config_label(best['config'])}**."]
    panels = [("dev_perplexity", "dev perplexity", base["perplexity"], f"base model ({base['perplexity']:.2f})"),
              ("dev_acc", "dev token accuracy", base["acc"], f"base model ({base['acc']:.2%})")]
    write_sweep(name, lines, plot_grid([config_label(c["config"]) for c in configs], configs, panels,
                                       f"{PLOTS_DIR}/tune_{name}.png"))
