"""The distillation objective: Hinton et al.'s KD loss (or Tang et al.'s squared distance between logits), the
soft term alone on the transfer set's unlabelled sentences."""
import torch
import torch.nn.functional as F

from train_utils import Classification

UNLABELLED = -1  # the label of a transfer sentence: the teacher's logits are all it has


def soft_rows(student, teacher, temperature, kind):
    """The soft term of each row (B,): Hinton's T^2 * KL(softmax(t/T) || softmax(s/T)) ("kl"), or Tang et al.'s
    squared distance between the logits themselves, ||t - s||^2 ("mse"; no temperature)."""
    s, t = student.float(), teacher.float()
    if kind == "mse":
        return ((s - t) ** 2).sum(-1)
    T = temperature
    log_p, log_q = F.log_softmax(t / T, -1), F.log_softmax(s / T, -1)
    return T * T * (log_p.exp() * (log_p - log_q)).sum(-1)


def kd_loss(student, teacher, labels, temperature, alpha, kind="kl"):
    """The distillation loss, the mean over rows of: alpha * soft + (1 - alpha) * CE(s, y) on a labelled row (with
    "kl", Hinton et al.'s loss), the soft term alone, at full weight, on a transfer row (label UNLABELLED): alpha
    trades the soft term against the hard one, and a transfer row has no hard one.

    T^2 keeps the soft part's gradients on the scale of the hard part's as T grows.
    """
    soft = soft_rows(student, teacher, temperature, kind)
    labelled = labels != UNLABELLED
    hard = F.cross_entropy(student.float(), labels.clamp_min(0), reduction="none")
    return torch.where(labelled, alpha * soft + (1 - alpha) * hard, soft).mean()


class KDLoss(Classification):
    """A student's objective: a classifier's, but with kd_loss against the teacher's logits as its loss."""

    def __init__(self, temperature, alpha, kind="kl"):
        self.temperature, self.alpha, self.kind = temperature, alpha, kind

    def __call__(self, logits, labels, teacher):
        return kd_loss(logits, teacher, labels, self.temperature, self.alpha, self.kind)
