"""What a person reads in the terminal: tables of scores, the parameter table, a run's summary and predict's output."""
import json
import sys

from model import LABELS, count_parameters
from reporting.number_format import formatted
from training.metrics import ECE_BINS, majority_label, scores
from utils import UserError


def format_table(headers, rows):
    """A plain-text table with right-aligned columns."""
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    lines = ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def score_headers(title, n_classes):
    return [f"{title} acc", "MCC"] + (["macro-F1"] if n_classes > 2 else [])


def score_cells(s):
    """Table cells: 'acc% [low, high]', 'MCC [low, high]' and, when scored, 'macro-F1 [low, high]'."""
    (al, ah), (ml, mh) = s["acc_ci"], s["mcc_ci"]
    cells = [f"{s['acc']:.2%} [{al:.1%}, {ah:.1%}]", f"{s['mcc']:+.3f} [{ml:+.2f}, {mh:+.2f}]"]
    if "f1" in s:
        cells.append(f"{s['f1']:.3f} [{s['f1_ci'][0]:.2f}, {s['f1_ci'][1]:.2f}]")
    return cells


def parameter_rows(total, trainable):
    """The assignment's three lines of parameter counts, as (label, value): the terminal's, the report's and the
    model card's."""
    return [("Number of parameters", formatted(total, "millions")),
            ("Number of trainable parameters", formatted(trainable, "millions")),
            ("Reduction", f"{100 * (1 - trainable / total):.2f}%")]


def print_parameter_table(model, trained=False):
    """The parameter counts in the assignment's three lines (a tied weight counted once); with `trained`, a fourth
    naming what trains."""
    for label, value in parameter_rows(*count_parameters(model)):
        print(f"{label}: {value}")
    if trained:
        print(f"Trained: {trained_parts(model)}")


def trained_parts(model):
    """The trainable tensors by the short name of what holds them, e.g. 'ln_1, ln_2, ln_f, lora_A, lora_B, score'
    (in every block where a block has them), or 'every weight'."""
    named = list(model.named_parameters())
    if all(p.requires_grad for _, p in named):
        return "every weight"
    return ", ".join(sorted({name.split(".")[-2] if name.endswith((".weight", ".bias")) else name.split(".")[-1]
                             for name, p in named if p.requires_grad}))


def print_run_summary(mode, best_epoch, epochs, s, splits):
    on = "" if splits.spec.is_cola else f" on {splits.spec.name}"
    print(f"\n{mode}{on}: best epoch {best_epoch} of {epochs} (95% intervals: Wilson for accuracy, bootstrap for "
          f"{'MCC and macro-F1' if len(splits.labels) > 2 else 'MCC'})")
    headers = [h for name in splits.evaluated for h in score_headers(splits.titles[name], len(splits.labels))]
    cells = {who: [c for name in splits.evaluated for c in score_cells(s[who][name])] for who in ("model", "baseline")}
    print(format_table(["", *headers], [[mode, *cells["model"]], ["majority baseline", *cells["baseline"]]]))
    print(calibration_line(s["calibration"], splits.titles["dev"]))
    for note in splits.notes:
        print(f"note: {note}")


def calibration_line(c, title):
    """The ECE of a model before and after temperature scaling, and where its temperature was fitted."""
    where = (f"T = {c['temperature']:.2f} fitted on {c['heldout']} held-out training sentences" if c["heldout"]
             else "no held-out training sentences: T = 1")
    return (f"{title} ECE ({ECE_BINS} bins) {c['ece']:.3f}; after temperature scaling {c['ece_scaled']:.3f} "
            f"({where})")


def prediction_rows(sentences, probs, names):
    """One row per sentence and the predicted ids: CoLA's label and p_acceptable, or for other label sets the
    predicted label and its probability `p`."""
    if tuple(names) == LABELS:
        p_acceptable = probs[:, 1].tolist()
        preds = [int(p >= 0.5) for p in p_acceptable]
        return [{"sentence": s, "label": LABELS[y], "p_acceptable": round(p, 6)}
                for s, y, p in zip(sentences, preds, p_acceptable)], preds
    p, preds = probs.max(-1)
    return [{"sentence": s, "label": names[y], "p": round(q, 6)}
            for s, y, q in zip(sentences, preds.tolist(), p.tolist())], preds.tolist()


def print_predictions(sentences, probs, names, labels, fmt):
    """One line per sentence (its label and probability) as a table, jsonl or tsv; with labels (names, None where a
    row has none), then the scores with their intervals beside the majority class (on stderr unless a table)."""
    rows, preds = prediction_rows(sentences, probs, names)
    p_key = next(k for k in rows[0] if k.startswith("p")) if rows else "p"
    if fmt == "jsonl":
        print("\n".join(json.dumps(r, ensure_ascii=False) for r in rows))
    elif fmt == "tsv":
        print("\n".join(f"{r['label']}\t{r[p_key]:.4f}\t{r['sentence']}" for r in rows))
    else:
        print(format_table(["label", p_key, "sentence"],
                           [[r["label"], f"{r[p_key]:.4f}", r["sentence"]] for r in rows]))
    if labels is not None:
        print_prediction_scores(preds, labels, names, file=sys.stdout if fmt == "table" else sys.stderr)


def print_prediction_scores(preds, labels, names, file):
    """Accuracy and MCC (and macro-F1 past two classes) of the rows that have a label the model knows."""
    unknown = sorted({y for y in labels if y is not None and y not in names})
    if unknown:
        raise UserError(f"the input's label {unknown[0]!r} is not one the model was trained on ({', '.join(names)})")
    rows = [i for i, y in enumerate(labels) if y is not None]
    if not rows:
        print(f"no row has a label: nothing scored ({len(labels)} unlabelled rows)", file=file)
        return
    ids = [names.index(labels[i]) for i in rows]
    s = scores([preds[i] for i in rows], ids, len(names))
    majority = scores([majority_label(ids)] * len(ids), ids)["acc"]
    (acc_low, acc_high), (mcc_low, mcc_high) = s["acc_ci"], s["mcc_ci"]
    f1 = f"  macro-F1 {s['f1']:.3f} [{s['f1_ci'][0]:.2f}, {s['f1_ci'][1]:.2f}]" if "f1" in s else ""
    skipped = f" ({len(labels) - len(rows)} unlabelled rows not scored)" if len(rows) < len(labels) else ""
    print(f"accuracy {s['acc']:.2%}  MCC {s['mcc']:+.3f}{f1}  on {len(ids)} labelled sentences{skipped}; 95% "
          f"intervals: accuracy {acc_low:.1%}-{acc_high:.1%}, MCC {mcc_low:+.2f} to {mcc_high:+.2f}; "
          f"this file's majority class scores {majority:.2%} (MCC 0)", file=file)
