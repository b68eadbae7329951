"""`python run.py tune MODE --search optuna`: a sweep that searches. Optuna's sampler draws each trial's flags from
`--space`; a trial is one configuration run once per seed through the plain subcommand (tune.planned_run), scored
by its mean dev metric, and each epoch's dev metric goes to the trial so that the pruner can stop a poor one early.
The study lives in a database (tuning/<name>.db, or --storage), which any number of workers share.

Optuna is imported inside the functions that use it, so that the rest of run.py works without it."""
from dataclasses import dataclass, field, replace
import math
from pathlib import Path
import shlex
import statistics
import time
import warnings

import torch

from cli.grid_sweep import (check_sweep_command, check_varied_flag, is_lm, logged_run, mcnemar_lines, output_flag,
                            planned_run, run_side_by_side, sweep_base)
from cli.parser import command_line
from config.checks import shown_storage
from config.fields import build
from config.records import read_records
from config.subcommands import SUBCOMMANDS
from textdata.readers import load_text_data, run_stem
from train_utils import Diverged, Interrupted
from training.plots import plot_search
from training.resume_state import resume_state_path
from training.run_watch import Pruned
from utils import PLOTS_DIR, TUNING_DIR, UsageError, UserError, safe_name, write_text

# --metric: the field of a run's record (and of each epoch's row) it reads, its name, and Optuna's direction.
METRICS = {"acc": ("dev_acc", "dev accuracy", "maximize"), "mcc": ("dev_mcc", "dev MCC", "maximize"),
           "perplexity": ("dev_perplexity", "dev perplexity", "minimize")}
KINDS = ("log", "float", "int", "cat")
# A running trial records a heartbeat every HEARTBEAT_S seconds; one silent for GRACE_S is failed and queued
# again (at most MAX_RETRY times), so a killed worker's trial goes to another worker.
HEARTBEAT_S, GRACE_S, MAX_RETRY = 10, 60, 3
POLL_S = 2  # a worker waiting for trials that run elsewhere looks at the study this often (one query)
TOP = 10  # trials listed in the summary


@dataclass
class Dim:
    """One flag's range in --space: `kind` log|float|int between low and high, or cat among choices."""
    kind: str
    low: float = None
    high: float = None
    choices: list = field(default_factory=list)

    def ends(self):
        """The values that bound the range, as command-line text: checking them checks every value between."""
        return self.choices if self.kind == "cat" else [str(self.low), str(self.high)]

    def suggest(self, trial, flag):
        """The trial's value of `flag`, as command-line text."""
        if self.kind == "cat":
            return trial.suggest_categorical(flag, self.choices)
        if self.kind == "int":
            return str(trial.suggest_int(flag, self.low, self.high))
        return repr(trial.suggest_float(flag, self.low, self.high, log=self.kind == "log"))


def parse_dim(item, kind, bounds):
    """The Dim of one --space entry `item` (flag=kind:bounds), or one line (exit 2) saying what is wrong."""
    if kind == "cat":
        choices = bounds.split(",") if bounds else []
        if not choices or "" in choices:
            raise UsageError(f"--space {item}: expected cat:A,B,... (the choice list is empty, or holds an empty choice)")
        if len(set(choices)) < len(choices):
            raise UsageError(f"--space {item}: a choice is given twice")
        return Dim(kind, choices=choices)
    number = int if kind == "int" else float
    try:
        low, high = map(number, bounds.split(":"))
    except ValueError:
        low = high = math.nan
    if not (math.isfinite(low) and math.isfinite(high)):
        raise UsageError(f"--space {item}: expected {kind}:LOW:HIGH, two {'integers' if kind == 'int' else 'numbers'}")
    if kind == "log" and min(low, high) <= 0:
        raise UsageError(f"--space {item}: a log range needs bounds above 0")
    if low >= high:
        raise UsageError(f"--space {item}: the low bound {low} must be below the high bound {high}")
    return Dim(kind, low, high)


def parse_space(target, items):
    """{flag: Dim} from --space's entries; what the grid refuses to vary (tune.check_varied_flag) is refused too."""
    space = {}
    for item in items:
        flag, _, spec = item.partition("=")
        flag = flag.lstrip("-")
        kind, _, bounds = spec.partition(":")
        if not flag or kind not in KINDS:
            raise UsageError(f"--space {item}: expected flag=kind:..., the kind one of {', '.join(KINDS)} "
                         "(e.g. lr=log:1e-4:3e-3, rnn_cell=cat:rnn,gru)")
        check_varied_flag("--space", item, flag, target, space)
        space[flag] = parse_dim(item, kind, bounds)
    return space


@dataclass
class SearchPlan:
    """A checked search: tune's configuration (its metric filled in), the flag values every run shares (`base`: see
    grid_sweep.sweep_base) and the command line they came from, the study's name, its space, the runs' dataset and
    whether they train a language model, where the runs are logged and where the study is stored."""
    tune: object
    base: dict
    rest: list
    name: str
    space: dict
    spec: object
    lm: bool
    log: str
    storage: str

    def identity(self):
        """What makes two commands the same study: a worker whose command differs is refused."""
        a = self.tune
        return {"mode": a.target, "space": list(a.space), "seeds": list(a.seeds), "metric": a.metric,
                "flags": list(self.rest)}


def search_plan(parser, tune, rest):
    """The SearchPlan of `tune --search optuna`, every flag checked before anything runs: each end of each
    range (and each choice) makes a run's configuration, validated as a trial's run will be."""
    check_sweep_command(tune, rest)
    space = parse_space(tune.target, tune.space)
    base = sweep_base(parser, tune, rest)
    first_run = build(SUBCOMMANDS[tune.target], base)
    lm = is_lm(first_run)
    tune = replace(tune, metric=tune.metric or ("perplexity" if lm else "acc"))
    if tune.metric == "perplexity" and not lm:
        raise UsageError(f"--metric perplexity: {tune.target} runs record no perplexity (a language-model run does: "
                         "LoRA --task lm); use --metric acc or mcc")
    if tune.metric == "mcc" and lm:
        raise UsageError("--metric mcc: a language model's runs record no MCC; use --metric perplexity (the default "
                         "for --task lm) or acc (its token accuracy)")
    spec = first_run.data
    name = safe_name(tune.name or "_".join([run_stem(tune.target, spec), "search", *space]))
    first = {flag: dim.ends()[0] for flag, dim in space.items()}
    for flag, dim in space.items():
        for value in dim.ends():
            planned_run(tune, base, name, first | {flag: value}, tune.seeds[0])
    database = Path(TUNING_DIR, f"{name}.db")
    if not tune.storage and database.exists() and not database.is_file():
        raise UsageError(f"{database}: not a file, where the study {name} keeps its trials (its database); move it "
                         "away, or give another --name or a --storage")
    storage = tune.storage or f"sqlite:///{database}"
    return SearchPlan(tune, base, rest, name, space, spec, lm, f"{TUNING_DIR}/{run_stem(tune.target, spec)}.jsonl",
                      storage)


def is_database(url):
    return "://" in url


def is_server(url):
    return is_database(url) and not url.startswith("sqlite")


def shown(url):
    """The storage URL as it is printed and written in the summary: a database password hidden."""
    return shown_storage(url) if is_database(url) else url


def open_storage(url):
    """A database URL (SQLite, PostgreSQL, MySQL: RDBStorage with the heartbeat), or else a journal file, for a
    filesystem that workers share without a database (JournalStorage has no heartbeat)."""
    import optuna
    if not is_database(url):
        Path(url).parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(url))
    engine = {"connect_args": {"timeout": 60}} if url.startswith("sqlite") else {}  # workers wait for the lock
    return optuna.storages.RDBStorage(
        url, engine_kwargs=engine, heartbeat_interval=HEARTBEAT_S, grace_period=GRACE_S,
        heartbeat_stale_trial_callback=optuna.storages.RetryHeartbeatStaleTrialCallback(max_retry=MAX_RETRY))


def create_or_load(plan, attempts=3):
    """The study, created if it is new. Workers started together (a job array) may collide creating the same
    tables or study, and the one that loses finds them made when it tries again."""
    import optuna
    pruner = optuna.pruners.MedianPruner() if plan.tune.pruner == "median" else optuna.pruners.NopPruner()
    for attempt in range(1, attempts + 1):
        try:
            return optuna.create_study(study_name=plan.name, storage=open_storage(plan.storage), pruner=pruner,
                                       direction=METRICS[plan.tune.metric][2], load_if_exists=True)
        except Exception as e:  # also an unknown database kind, a server that does not answer, a file not writable
            if attempt == attempts:
                reason = str(e).strip().splitlines()[0] if str(e).strip() else "no message"
                where = f"--storage {shown(plan.storage)}" if plan.tune.storage else f"the study's {plan.storage}"
                raise UserError(f"{where}: cannot open the study ({type(e).__name__}: {reason})") from None
            time.sleep(attempt)


def open_study(plan):
    """The plan's study, created or continued; a study made by a different command is refused."""
    import optuna
    optuna.logging.set_verbosity(optuna.logging.ERROR)  # our lines say what happens to each trial
    warnings.filterwarnings("ignore", category=optuna.exceptions.ExperimentalWarning)
    if not is_server(plan.storage):  # a study on a database server writes nothing here until its first trial
        Path(TUNING_DIR).mkdir(exist_ok=True)
    study = create_or_load(plan)
    held, wanted = study.user_attrs.get("sweep"), plan.identity()
    if held is None:
        study.set_user_attr("sweep", wanted)
    elif held != wanted:
        key = next(k for k in wanted if held.get(k) != wanted[k])
        raise UserError(f"study {plan.name} in {shown(plan.storage)} was made with {key} {held.get(key)}, this command "
                        f"has {wanted[key]}; rerun that command, or give another --name")
    return study


def optimize(tune, plan, execute, argv):
    """Work on the study until it has --trials finished trials, then summarize it. With --parallel N, N workers
    (processes of this same command, one GPU each when there are GPUs) share it. Stopped by Ctrl-C or SIGTERM, it
    says which command continues the study: `argv`, the sweep's own command line."""
    study = open_study(plan)  # creates it once, before any worker starts
    if tune.parallel > 1:
        run_side_by_side([(f"worker {k}", worker_argv(plan)) for k in range(1, tune.parallel + 1)],
                         tune.parallel, Path(TUNING_DIR) / f"{plan.name}-logs")
    else:
        work(study, plan, execute, argv)
    summarize_search(study, plan)


def worker_argv(plan):
    worker = replace(plan.tune, parallel=1, name=plan.name, storage=plan.storage)
    return [*command_line(worker), *plan.rest]


class Surplus(Exception):
    """A trial asked for when the trials before it already make up --trials (another worker asked at the same
    time): it is failed at once, never run."""


def work(study, plan, execute, argv):
    """Run trials one after another while the study needs them. A diverged run fails its trial and the search
    goes on; a trial stopped by Ctrl-C or SIGTERM is failed and queued again with the same flags."""
    while needs_a_trial(study, plan):
        asked = {}
        try:
            study.optimize(lambda trial: objective(trial, plan, execute, asked), n_trials=1,
                           catch=(Diverged, Surplus))
        except (Interrupted, KeyboardInterrupt) as e:
            trial = asked.get("trial")
            if trial is None or len(trial.params) < len(plan.space):
                raise
            study.enqueue_trial(trial.params, user_attrs={"retry_of": trial.number})
            if not isinstance(e, Interrupted):
                raise
            what = str(e).split(";")[0]  # "terminated (SIGTERM) during epoch 2"
            raise Interrupted(f"{what} of trial {trial.number}, which is queued to run again; continue the study "
                              f"with: python run.py {shlex.join(argv)}", e.exit_code) from None


def needs_a_trial(study, plan):
    """Whether this worker is to start a trial: the study has fewer than --trials finished (complete or pruned)
    and running ones, or a failed one waits to be run again. While the ones it lacks are all running elsewhere it
    waits, as they may yet fail (with the heartbeat, a killed worker's trial fails after GRACE_S s)."""
    import optuna
    state, waited = optuna.trial.TrialState, False
    while True:
        optuna.storages.fail_stale_trials(study)
        trials = study.get_trials(deepcopy=False)
        done = sum(t.state in (state.COMPLETE, state.PRUNED) for t in trials)
        running = [t.number for t in trials if t.state == state.RUNNING]
        if done >= plan.tune.trials:
            return False
        if any(t.state == state.WAITING for t in trials) or done + len(running) < plan.tune.trials:
            return True
        if not is_database(plan.storage):  # a journal has no heartbeat: a trial left running cannot be told dead
            print(f"trials {running} are running elsewhere: nothing left to start here")
            return False
        if not waited:
            print(f"waiting for trials {running}, running elsewhere (one whose worker stopped runs again here)")
            waited = True
        time.sleep(POLL_S)


def objective(trial, plan, execute, asked):
    """A trial: its configuration, run once per seed; the mean of the seeds' metric. Trial k's sampler is seeded
    with k, so a trial's draw depends on the trials finished before it, not on which worker runs it."""
    import optuna
    asked["trial"] = trial
    state = optuna.trial.TrialState
    ahead = trial.study.get_trials(deepcopy=False, states=(state.COMPLETE, state.PRUNED, state.RUNNING))
    if sum(t.number < trial.number for t in ahead) >= plan.tune.trials:
        trial.set_user_attr("surplus", True)
        print(f"trial {trial.number}: not run, the trials before it make up --trials {plan.tune.trials}")
        raise Surplus(f"trial {trial.number}: the study has its {plan.tune.trials} trials")
    trial.study.sampler = (optuna.samplers.RandomSampler(seed=trial.number) if plan.tune.sampler == "random" else
                           optuna.samplers.TPESampler(seed=trial.number, constant_liar=True))
    config = {flag: dim.suggest(trial, flag) for flag, dim in plan.space.items()}
    key, title, _ = METRICS[plan.tune.metric]
    try:
        records = [seed_run(trial, plan, config, i, seed, execute) for i, seed in enumerate(plan.tune.seeds)]
    except Diverged as e:
        print(f"trial {trial.number}: failed ({e})")
        raise
    trial.set_user_attr("runs", [{"seed": r.config.run.seed, "run_id": r["run_id"],
                                  **{k: r[k] for k in ("dev_acc", "dev_mcc", key) if k in r}} for r in records])
    score = statistics.mean(r[key] for r in records)
    print(f"trial {trial.number}: mean {title} {score:.4f} over {len(records)} seed{'s' * (len(records) > 1)}")
    return score


class TrialHook:
    """What a trial's run reports (runlog.RunWatch calls it): the study and trial in each of its records, and
    each epoch's dev metric, at step offset + epoch so that the seeds' runs follow one another in the trial."""

    def __init__(self, trial, plan, offset):
        self.trial, self.plan, self.offset = trial, plan, offset
        self.key = METRICS[plan.tune.metric][0]

    def fields(self):
        return {"study": self.plan.name, "trial": self.trial.number}

    def report(self, row):
        """Report an epoch's row; whether the pruner stops the trial there."""
        self.trial.report(row[self.key], self.offset + row["epoch"])
        return self.trial.should_prune()


def seed_run(trial, plan, config, index, seed, execute):
    """One seed's run of a trial, or its record when a run with the same flags is logged (a trial run again
    after its worker stopped). Returns the finished run's record."""
    import optuna
    run = planned_run(plan.tune, plan.base, plan.name, config, seed)
    hook = TrialHook(trial, plan, index * run["run"].train.epochs)
    label = f"trial {trial.number}: {', '.join(f'{k}={v}' for k, v in config.items())} seed={seed}"
    record = logged_run(run, read_records(plan.log))
    try:
        if record:
            print(f"[{label}]: already in {plan.log}, skipped")
            if [hook.report(row) for row in record["history"]][-1]:  # the pruner decides after the last
                raise Pruned(f"pruned after epoch {record['history'][-1]['epoch']}")
            return record
        print(f"\n[{label}]")
        execute(run["run"], trial=hook)
    except Pruned as e:
        print(f"trial {trial.number}: {e} of seed {seed}")
        out = getattr(run["run"], output_flag(plan.tune.target))
        resume_state_path(out).unlink(missing_ok=True)  # a pruned run is never continued
        raise optuna.TrialPruned(str(e)) from None
    return logged_run(run, read_records(plan.log))


def trial_text(params):
    return ", ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def mean_std(values):
    return statistics.mean(values), statistics.stdev(values) if len(values) > 1 else 0.0


def summary_rows(ranked, lm):
    """The table of the best trials: mean ± std over seeds of dev accuracy and MCC, or a language model's dev
    perplexity and token accuracy."""
    columns = ([("dev_perplexity", "dev perplexity", "{:.2f} ± {:.2f}"), ("dev_acc", "dev token accuracy",
                "{:.2%} ± {:.2%}")] if lm else
               [("dev_acc", "dev accuracy", "{:.2%} ± {:.2%}"), ("dev_mcc", "dev MCC", "{:+.3f} ± {:.3f}")])
    rows = ["| trial | configuration | seeds |" + "".join(f" {title} |" for _, title, _ in columns),
            "|---|---|---|" + "---|" * len(columns)]
    for t in ranked[:TOP]:
        runs = t.user_attrs["runs"]
        cells = "".join(" " + form.format(*mean_std([r[key] for r in runs])) + " |" for key, _, form in columns)
        rows.append(f"| {t.number} | {trial_text(t.params)} | {len(runs)} |{cells}")
    return rows


def best_runs(best, plan):
    """The records of the best trial's runs, or None when they are not all in this machine's log (a worker
    elsewhere logs its runs there)."""
    records = {r["run_id"]: r for r in read_records(plan.log) if r.finished}
    runs = [records.get(r["run_id"]) for r in best.user_attrs["runs"]]
    return None if None in runs else runs


def lm_baseline_lines(best, plan):
    """A language model's reference: the base model's dev perplexity before training, from the best runs' records."""
    runs = best_runs(best, plan)
    if runs is None:
        return [f"The best trial's runs are not all in {plan.log} here (run by a worker elsewhere)."]
    return [f"The base model, untrained, has dev perplexity {runs[0]['baseline_dev_perplexity']:.2f}."]


def best_runs_lines(best, plan, spec):
    """McNemar's test of the best trial's runs against the baseline, when their records are in this machine's log."""
    runs = best_runs(best, plan)
    if runs is None:
        return [f"The best trial's runs are not all in {plan.log} here (run by a worker elsewhere): no McNemar test."]
    labels = torch.tensor(load_text_data(spec).splits["dev"][1])
    return ["McNemar's exact test of the best configuration against the baseline, per seed (sentences right only "
            "with the best / only with the baseline; a small p says the difference is unlikely to be chance):", "",
            *mcnemar_lines({"runs": runs}, plan.tune.target, labels)]


def importances(study):
    """Each flag's importance to the metric (Optuna's fANOVA evaluator, seeded), or {} with fewer than two complete
    trials to learn it from."""
    import optuna
    try:
        found = optuna.importance.get_param_importances(
            study, evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0))
    except (ValueError, RuntimeError):
        return {}
    return {k: float(v) for k, v in found.items()}


def summarize_search(study, plan):
    """tuning/<name>.md and plots/tune_<name>.png: the best trials with mean ± std over seeds, the study's best
    configuration and McNemar's test of it against the baseline (the no-KD student for distil, else the majority
    class); the plot shows the optimisation history and each flag's importance."""
    import optuna
    state = optuna.trial.TrialState
    trials = study.get_trials(deepcopy=False)
    complete = [t for t in trials if t.state == state.COMPLETE]
    if not complete:
        raise UserError(f"study {plan.name}: no complete trial; see the messages above")
    key, title, direction = METRICS[plan.tune.metric]
    ranked = sorted(complete, key=lambda t: t.value, reverse=direction == "maximize")
    best = study.best_trial
    spec, lm = plan.spec, plan.lm
    on = "" if spec.is_cola else f" on {spec.name}"
    pruned = sum(t.state == state.PRUNED for t in trials)
    failed = sum(t.state == state.FAIL and not t.user_attrs.get("surplus") for t in trials)
    retried = sum("failed_trial" in t.system_attrs or "retry_of" in t.user_attrs for t in trials)
    lines = [f"# Search `{plan.name}` ({plan.tune.target}{on}, Optuna)", "",
             f"{len(complete)} complete trials, {pruned} pruned, {failed} failed, {retried} retried (a trial whose "
             f"worker stopped runs again; study in `{shown(plan.storage)}`). "
             f"A trial is one configuration run with seeds {list(plan.tune.seeds)}, scored by its "
             f"mean {title} ({'higher' if direction == 'maximize' else 'lower'} is better); mean ± standard "
             f"deviation over seeds. The {min(TOP, len(ranked))} best:", "",
             *summary_rows(ranked, lm), "",
             f"Best (the study's best, trial {best.number}): **{trial_text(best.params)}**, mean {title} "
             f"{best.value:.4f}.", "",
             *(lm_baseline_lines(best, plan) if lm else best_runs_lines(best, plan, spec))]
    text = "\n".join(lines) + "\n"
    write_text(f"{TUNING_DIR}/{plan.name}.md", text)
    history = [(t.number, t.value) for t in sorted(complete, key=lambda t: t.number)]
    plot = plot_search(history, importances(study), title, direction, f"{PLOTS_DIR}/tune_{plan.name}.png")
    print("\n" + text + f"\nsummary: {TUNING_DIR}/{plan.name}.md; plot: {plot}")
