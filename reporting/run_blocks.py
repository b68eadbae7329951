"""What one training run's record says, as document blocks: the parameter table, the hyper-parameters, the scores
beside their baseline, the calibration, and where the numbers come from. The report and the model card show a run
with these same blocks."""
import dataclasses
import os

from config.fields import is_section
from reporting.document import Code, Paragraph, Table
from reporting.number_format import formatted, with_interval
from runtime.provenance import reproducing_command
from training.metrics import ECE_BINS
from training.tables import parameter_rows

# The sections whose flags make a run's recipe, in the order the hyper-parameter table lists them.
RECIPE_SECTIONS = ("model", "lora", "lm", "train", "student", "distil", "transfer")
RECIPE_FLAGS = ("seed", "dtype")  # of the run section: the two that decide its result


def split_titles(record):
    """How the report names a record's evaluation splits (CoLA's are its in-domain and out-of-domain dev sets)."""
    if record.config.data.is_cola:
        return {"dev": "in-domain dev", "ood": "out-of-domain dev"}
    return {"dev": f"dev ({record.config.data.eval_split or 'validation'})",
            "ood": f"second evaluation ({record.config.data.test_split or 'test'})"}


def is_lm(record):
    return record.get("task") == "lm"


def parameter_table(record):
    """The parameter counts exactly as the training run printed them."""
    return Table(("", "count"), tuple(parameter_rows(record["parameters"], record["trainable_parameters"])))


def shown_value(value):
    return " ".join(map(str, value)) if isinstance(value, (list, tuple)) else str(value)


def hyperparameter_table(record):
    """The flags that decide the run's result (its seed and dtype, the model, LoRA, training, student and KD
    settings), with their values."""
    config, rows = record.config, []
    rows += [(f"--{name}", shown_value(getattr(config.run, name))) for name in RECIPE_FLAGS]
    for f in dataclasses.fields(config):
        if is_section(f) and f.name in RECIPE_SECTIONS:
            section = getattr(config, f.name)
            rows += [(f"--{g.name}", shown_value(getattr(section, g.name))) for g in dataclasses.fields(section)
                     if g.metadata.get("decides", True) and g.name not in config.LEFT_OUT
                     and getattr(section, g.name) is not None]
    return Table(("flag", "value"), tuple(rows))


def classifier_results(record):
    """The best epoch's accuracy (Wilson interval) and MCC (bootstrap interval) on each evaluation split, beside
    the majority class's."""
    titles = split_titles(record)
    names = [name for name in ("dev", "ood") if f"{name}_acc" in record]
    headers = ("", *(h for name in names for h in (f"{titles[name]} accuracy", f"{titles[name]} MCC")))
    ours = [c for name in names for c in (with_interval(record[f"{name}_acc"], record.get(f"{name}_acc_ci"), "percent"),
                                          with_interval(record[f"{name}_mcc"], record.get(f"{name}_mcc_ci"), "mcc"))]
    majority = [c for name in names for c in (formatted(record.get(f"baseline_{name}_acc"), "percent"),
                                              formatted(0.0, "mcc"))]
    return Table(headers, ((record.config.MODE, *ours), ("majority baseline", *majority)))


def lm_results(record):
    """The best epoch's perplexity and token accuracy on each evaluation split, beside the base model's."""
    titles = split_titles(record)
    names = [name for name in ("dev", "ood") if f"{name}_perplexity" in record]
    headers = ("", *(h for name in names for h in (f"{titles[name]} perplexity", f"{titles[name]} token accuracy")))
    rows = [(who, *(c for name in names for c in (formatted(record.get(f"{prefix}{name}_perplexity"), "perplexity"),
                                                   formatted(record.get(f"{prefix}{name}_acc"), "percent"))))
            for who, prefix in ((f"{record.config.MODE} --task lm", ""), ("base model, untrained", "baseline_"))]
    return Table(headers, tuple(rows))


def results_blocks(record):
    """The run's scores: which epoch, the table beside its baseline, and (a classifier) its calibration."""
    epochs = record.config.train.epochs
    best = (f"Best epoch {record['best_epoch']} of {epochs} (lowest dev perplexity)." if is_lm(record) else
            f"Best epoch {record['best_epoch']} of {epochs} by dev accuracy; 95% intervals: Wilson for accuracy, "
            "bootstrap for MCC.")
    blocks = [Paragraph(best), lm_results(record) if is_lm(record) else classifier_results(record)]
    c = record.get("calibration")
    if c:
        where = (f"T = {formatted(c['temperature'], 'temperature')} fitted on {formatted(c['heldout'], 'count')} "
                 "held-out training sentences" if c.get("heldout") else "no held-out training sentences: T = 1")
        blocks.append(Paragraph(f"{split_titles(record)['dev']} ECE ({ECE_BINS} bins) {formatted(c['ece'], 'ece')}; "
                                f"after temperature scaling {formatted(c['ece_scaled'], 'ece')} ({where})."))
    return blocks


def run_command(record):
    """The command that reproduces the run: as recorded, or (a record from before) made from its configuration."""
    return record.get("command") or reproducing_command(record.config)


def provenance_table(record, run_id):
    """Where one run's numbers come from: its id, date, seed, code commit, device, dtype, wall time, libraries."""
    versions = record.get("versions") or {}
    rows = (("run", run_id), ("date", record.get("time", "-")), ("seed", str(record.config.run.seed)),
            ("commit", record.get("commit") or "not recorded"), ("device", record.get("device", "-")),
            ("dtype", record.get("dtype", "-")), ("wall time", formatted(record.get("wall_seconds"), "seconds")),
            ("libraries", ", ".join(f"{k} {v}" for k, v in versions.items()) or "not recorded"))
    return Table(("", "value"), rows)


def provenance_blocks(record, run_id):
    return [provenance_table(record, run_id), Paragraph("Command that reproduces it:"), Code(run_command(record))]


def local_path(name):
    """True for a model or dataset named by a path on this machine rather than a Hub id (the Hub's YAML takes ids)."""
    return name is not None and (os.path.isabs(name) or name.startswith(".") or os.path.exists(name))
