"""What a language model trains for (`LoRA --task lm`): the next-token loss, perplexity, and its run's summary
beside the base model's perplexity before training (the language model's analogue of the majority class)."""
import math
import time

import torch
import torch.nn.functional as F

from runtime.devices import autocast
from runtime.distributed import all_reduce_sum, rank, world_size
from textdata.batches import IGNORE, collate, micro_batches, sorted_batches
from training.objective import Objective
from training.tables import format_table

EVAL_TOKENS = 2048  # padded tokens per forward pass when evaluating: bounds the (tokens, vocab) logits in memory


def next_token_loss(logits, targets, reduction="mean"):
    """Cross-entropy of each position's target token (B, T) under its logits (B, T, vocab), IGNORE positions left
    out: transformers' GPT2LMHeadModel loss with the labels already shifted (the target of position t is token
    t + 1)."""
    return F.cross_entropy(logits.float().flatten(0, 1), targets.flatten(), ignore_index=IGNORE, reduction=reduction)


def perplexity(loss):
    """exp of the mean negative log-likelihood per target token (inf past what a float holds)."""
    return math.exp(loss) if loss < 709 else math.inf


class NextToken(Objective):
    """A language model's objective: the mean next-token loss over the target tokens (a padded or prompt position
    has none); an epoch records dev perplexity and token accuracy, and the best epoch has the lowest dev loss, so
    the lowest perplexity."""

    def outputs(self, model, ids, lengths):
        return model(ids)  # causal attention: right padding never reaches a real position

    def __call__(self, logits, targets, teacher=None):
        return next_token_loss(logits, targets)

    def counts(self, logits, targets):
        scored = targets != IGNORE
        return ((logits.argmax(-1) == targets) & scored).sum(), scored.sum()

    @torch.no_grad()
    def evaluate(self, model, split, *, batch_size, device, dtype):
        """Loss (mean NLL per target token), perplexity and token accuracy of a split, batched by length and
        dealt out to the ranks under torchrun."""
        was_training, start = model.training, time.perf_counter()
        model.eval()
        lengths = [len(t) for t in split.tokens]
        nll = correct = targets = 0.0
        for index in sorted_batches(lengths, batch_size)[rank()::world_size()]:
            for piece in micro_batches(index, lengths, EVAL_TOKENS):
                ids, lens, labels, _ = collate(split, piece, device)
                with autocast(device, dtype):
                    logits = self.outputs(model, ids, lens)
                nll += float(next_token_loss(logits, labels, reduction="sum"))
                right, scored = self.counts(logits, labels)
                correct, targets = correct + int(right), targets + int(scored)
        model.train(was_training)
        nll, correct, targets = all_reduce_sum([nll, correct, targets])
        loss = nll / max(1, targets)
        return {"loss": loss, "perplexity": perplexity(loss), "acc": correct / max(1, targets), "score": -loss,
                "target_tokens": int(targets), "tokens_per_s": targets / (time.perf_counter() - start)}

    def epoch_fields(self, train_loss, dev):
        return {"train_perplexity": perplexity(train_loss), "dev_perplexity": dev["perplexity"], "dev_acc": dev["acc"]}

    def baseline(self, model, splits, **on):
        """The base model's dev perplexity: the model before any training, whose LoRA updates start at zero."""
        self.base = {name: self.evaluate(model, splits[name], **on) for name in splits.evaluated}
        return self.base["dev"]["perplexity"]

    def conclude(self, model, splits, run, **on):
        """The best epoch's evaluations (dev, and test when there is one) beside the base model's."""
        final = self.final_evaluations(model, splits, run, **on)
        record = {f"{who}{name}_{k}": e[k] for who, evaluations in (("", final), ("baseline_", self.base))
                  for name, e in evaluations.items() for k in ("loss", "perplexity", "acc")}
        return final, {"final": final, "record": record | {"dev_tokens_per_s": final["dev"]["tokens_per_s"]}}

    def print_summary(self, mode, run, epochs, s, splits):
        print(f"\n{mode} --task lm on {splits.spec.name}: best epoch {run['best_epoch']} of {epochs} (lowest dev "
              "perplexity)")
        names = splits.evaluated
        headers = [h for name in names for h in (f"{splits.titles[name]} perplexity", "token acc")]
        rows = [[who, *[c for name in names for c in (f"{e[name]['perplexity']:.2f}", f"{e[name]['acc']:.2%}")]]
                for who, e in ((mode, s["final"]), ("base model, untrained", self.base))]
        print(format_table(["", *headers], rows))
        print(f"({s['final']['dev']['target_tokens']:,} target tokens in {splits.titles['dev']})")
        for note in splits.notes:
            print(f"note: {note}")
