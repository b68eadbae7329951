"""What every mode's objective supplies to the one training loop (train_utils): a mode changes the model and its
objective, never the loop. Classification (train_utils), the KD loss (training.kd_loss) and the next-token loss
(training.lm_objective) implement it."""
from abc import ABC, abstractmethod


class Objective(ABC):
    """How the loop calls the model on a batch, what it minimizes, what counts as right, how a split is scored and
    what a run reports. Losses are means over a piece's units (textdata.batches.Split.units: sentences, or a
    language model's target tokens)."""

    @abstractmethod
    def outputs(self, model, ids, lengths):
        """The model's outputs on a padded batch (ids (B, T), each row's real length)."""

    @abstractmethod
    def __call__(self, outputs, targets, teacher=None):
        """The loss of a piece: the mean over its units."""

    @abstractmethod
    def counts(self, outputs, targets):
        """(right predictions, predictions that have a target), as tensors where they were computed."""

    @abstractmethod
    def evaluate(self, model, split, *, batch_size, device, dtype):
        """A split's evaluation: at least its "loss", its "acc" and its "score" (higher is better: the best epoch
        has the highest dev score)."""

    @abstractmethod
    def epoch_fields(self, train_loss, dev):
        """What an epoch's row of the run's history records of this objective, beside the losses."""

    @abstractmethod
    def baseline(self, model, splits, **on):
        """The reference the plots draw (the majority class's accuracy, the untrained model's perplexity)."""

    @abstractmethod
    def conclude(self, model, splits, run, **on):
        """The best epoch's evaluations {split: evaluation} and its scores, whose "record" goes to the run's
        record."""

    @abstractmethod
    def print_summary(self, mode, run, epochs, s, splits):
        """The run's summary table."""

    def final_evaluations(self, model, splits, run, **on):
        """{split: evaluation} of the best epoch on dev (done after that epoch, whose weights are restored) and on
        the second evaluation split, when there is one."""
        final = {"dev": run["best_dev"]}
        if "ood" in splits:
            final["ood"] = self.evaluate(model, splits["ood"], **on)
        return final
