"""The numbers a run reports: accuracy, MCC and macro-F1 with their intervals, McNemar's test, the majority
class."""
import math
import statistics

import torch


def class_counts(values, n_classes, weights=None):
    """How often each class occurs in each row, (..., N) -> (..., n_classes), each occurrence counted `weights`."""
    weights = torch.ones_like(values, dtype=torch.double) if weights is None else weights.double()
    return torch.zeros(*values.shape[:-1], n_classes, dtype=torch.double).scatter_add_(-1, values, weights)


def mcc_rows(preds, labels):
    """MCC of each row of predictions against the same row of labels (..., N) -> (...), in its multi-class form
    (Gorodkin's, as scikit-learn computes it; the familiar formula for two classes): (c s - t.p) over
    sqrt((s^2 - p.p)(s^2 - t.t)), t and p the true and predicted class counts, c the correct ones, s the total.
    0 where that is undefined (e.g. one class only)."""
    preds, labels = preds.long(), labels.long()
    n_classes = int(max(preds.max(), labels.max())) + 1
    t, p = class_counts(labels, n_classes), class_counts(preds, n_classes)
    c, s = (preds == labels).sum(-1).double(), labels.size(-1)
    denom = ((s * s - (p * p).sum(-1)) * (s * s - (t * t).sum(-1))).sqrt()
    return torch.where(denom > 0, (c * s - (t * p).sum(-1)) / denom.clamp_min(1e-12), torch.zeros_like(denom))


def macro_f1_rows(preds, labels):
    """Macro-F1 of each row (..., N) -> (...): the mean F1 = 2 TP / (true + predicted) over the classes present in
    the labels or the predictions, as scikit-learn averages it."""
    preds, labels = preds.long(), labels.long()
    n_classes = int(max(preds.max(), labels.max())) + 1
    t, p = class_counts(labels, n_classes), class_counts(preds, n_classes)
    tp = class_counts(labels, n_classes, weights=preds == labels)
    present = (t + p) > 0
    return (2 * tp / (t + p).clamp_min(1)).sum(-1) / present.sum(-1)


def matthews_corrcoef(preds, labels):
    return float(mcc_rows(torch.as_tensor(preds), torch.as_tensor(labels)))


def macro_f1(preds, labels):
    return float(macro_f1_rows(torch.as_tensor(preds), torch.as_tensor(labels)))


def wilson_interval(correct, n, level=0.95):
    """Wilson score interval of a proportion correct/n (sound near 0 and 1, unlike the normal approximation)."""
    z = statistics.NormalDist().inv_cdf((1 + level) / 2)
    if n == 0:
        return 0.0, 1.0
    p = correct / n
    center = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    return max(0.0, center - half), min(1.0, center + half)


def bootstrap(metric_rows, preds, labels, resamples=1000, seed=0, level=0.95):
    """Percentile bootstrap interval of a metric: resample sentences with replacement (seeded)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    g = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, len(labels), (resamples, len(labels)), generator=g)
    values = metric_rows(preds[idx], labels[idx])
    low, high = torch.quantile(values, torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.double)).tolist()
    return low, high


def bootstrap_mcc(preds, labels, resamples=1000, seed=0, level=0.95):
    return bootstrap(mcc_rows, preds, labels, resamples, seed, level)


def mcnemar_exact(correct_a, correct_b):
    """McNemar's exact test on paired per-sentence correctness: (only A right, only B right, two-sided p)."""
    a, b = torch.as_tensor(correct_a).bool(), torch.as_tensor(correct_b).bool()
    only_a, only_b = int((a & ~b).sum()), int((~a & b).sum())
    n, k = only_a + only_b, min(only_a, only_b)
    p = min(1.0, 2 * sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n) if n else 1.0
    return only_a, only_b, p


def scores(preds, labels, n_classes=2):
    """Accuracy with its Wilson interval and MCC with its bootstrap interval, for a prediction vector; with more
    than two classes, macro-F1 and its bootstrap interval too (for two, MCC already weighs both classes)."""
    preds, labels = torch.as_tensor(preds), torch.as_tensor(labels)
    correct = int((preds == labels).sum())
    out = {"acc": correct / len(labels), "acc_ci": wilson_interval(correct, len(labels)),
           "mcc": matthews_corrcoef(preds, labels), "mcc_ci": bootstrap_mcc(preds, labels)}
    if n_classes > 2:
        out |= {"f1": macro_f1(preds, labels), "f1_ci": bootstrap(macro_f1_rows, preds, labels)}
    return out


def majority_label(train_labels):
    """The training set's most common label: always answering it is the baseline (MCC 0). A tie goes to the
    higher label (for CoLA, "acceptable")."""
    counts = torch.bincount(torch.as_tensor(train_labels).long())
    return int(torch.nonzero(counts == counts.max()).max())


def majority_accuracy(splits):
    """Dev accuracy of always answering the training set's most common label."""
    majority = majority_label(splits["train"].labels)
    return scores([majority] * len(splits["dev"]), splits["dev"].labels, len(splits.labels))["acc"]


def final_scores(final, splits):
    """Scores of the best epoch's predictions and of the majority baseline on each evaluation split."""
    majority, n = majority_label(splits["train"].labels), len(splits.labels)
    return {"majority": majority,
            "model": {name: scores(final[name]["preds"], splits[name].labels, n) for name in splits.evaluated},
            "baseline": {name: scores([majority] * len(splits[name]), splits[name].labels, n)
                         for name in splits.evaluated}}


ECE_BINS = 15


def reliability_bins(probs, labels, bins=ECE_BINS):
    """Per equal-width bin of confidence (the top probability; a bin holds (low, high], the first [0, high]):
    sentences, mean confidence and accuracy, as three (bins,) tensors."""
    probs, labels = torch.as_tensor(probs, dtype=torch.double), torch.as_tensor(labels)
    confidence, preds = probs.max(-1)
    correct = (preds == labels).double()
    edges = torch.linspace(0, 1, bins + 1, dtype=torch.double)[1:-1]
    index = torch.searchsorted(edges, confidence, right=False)
    count = torch.zeros(bins, dtype=torch.double).index_add_(0, index, torch.ones_like(confidence))
    conf = torch.zeros(bins, dtype=torch.double).index_add_(0, index, confidence) / count.clamp_min(1)
    acc = torch.zeros(bins, dtype=torch.double).index_add_(0, index, correct) / count.clamp_min(1)
    return count, conf, acc


def expected_calibration_error(probs, labels, bins=ECE_BINS):
    """ECE (Guo et al., 2017): the mean over sentences of |accuracy - confidence| of their confidence bin."""
    count, conf, acc = reliability_bins(probs, labels, bins)
    return float((count * (acc - conf).abs()).sum() / count.sum())


def nll(logits, labels, temperature=1.0):
    return float(torch.nn.functional.cross_entropy(torch.as_tensor(logits).double() / temperature,
                                                   torch.as_tensor(labels)))


def fit_temperature(logits, labels, steps=60):
    """The temperature T that minimises the NLL of softmax(logits / T) on (logits, labels). The NLL is convex in
    1/T, so a golden-section search over log(1/T) in [-5, 5] finds it; T = 1 is kept unless the search does
    better, so the fitted T never raises the NLL it was fitted on."""
    def loss(log_beta):
        return nll(logits, labels, math.exp(-log_beta))

    low, high, ratio = -5.0, 5.0, (math.sqrt(5) - 1) / 2
    for _ in range(steps):
        a, b = high - ratio * (high - low), low + ratio * (high - low)
        low, high = (low, b) if loss(a) < loss(b) else (a, high)
    found = math.exp(-(low + high) / 2)
    return found if nll(logits, labels, found) < nll(logits, labels) else 1.0


def calibration(heldout_logits, heldout_labels, dev_logits, dev_labels):
    """ECE on dev before and after temperature scaling, T fitted on held-out training sentences (never on dev);
    without any held out, T stays 1."""
    dev_logits = torch.as_tensor(dev_logits).double()
    fitted = heldout_logits is not None and len(heldout_labels) > 0
    T = fit_temperature(heldout_logits, heldout_labels) if fitted else 1.0
    out = {"temperature": T, "heldout": len(heldout_labels) if fitted else 0,
           "ece": expected_calibration_error(dev_logits.softmax(-1), dev_labels),
           "ece_scaled": expected_calibration_error((dev_logits / T).softmax(-1), dev_labels)}
    if fitted:
        out |= {"heldout_nll": nll(heldout_logits, heldout_labels),
                "heldout_nll_scaled": nll(heldout_logits, heldout_labels, T)}
    return out
