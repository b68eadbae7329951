"""Tang et al.'s (2019) rule-based augmentation of a training set into a transfer set for distillation: per word,
mask it or replace it by another word, then maybe keep only a random n-gram.

Words are the whitespace-separated pieces of a sentence (punctuation stays on its word, as CoLA writes "rocks.").
Tang et al. replace a word by one of the same part of speech; no tagger installs here with its model, so a word is
replaced by a draw from the training corpus' unigram distribution (a word other than itself). A masked word is
shown as MASK, "___": GPT-2's vocabulary has no mask token, "___" is the blank of fill-in-the-blank text that
GPT-2 read in pre-training, it is one token with or without its leading space, and teacher and student read the
same text. (<|endoftext|> is GPT-2's document boundary, not a missing word.)"""
from collections import Counter
import random

from tqdm import tqdm

MASK = "___"
LONGEST_NGRAM = 5


def normalised(sentence):
    """What two sentences must share to count as the same: their words, lower-cased, single-spaced."""
    return " ".join(sentence.lower().split())


class Unigram:
    """Draws words of a corpus as often as they occur in it."""

    def __init__(self, sentences):
        counts = Counter(w for s in sentences for w in s.split())
        self.words = sorted(counts)
        self.cumulative, total = [], 0
        for w in self.words:
            total += counts[w]
            self.cumulative.append(total)

    def other_than(self, word, rng):
        """A draw other than `word` (a replacement changes the word); `word` itself if it is the only one."""
        if len(self.words) < 2:
            return word
        while True:
            drawn = rng.choices(self.words, cum_weights=self.cumulative)[0]
            if drawn != word:
                return drawn


def augment_words(words, rng, unigram, p_mask, p_replace, p_ngram):
    """One augmented copy of a list of words: each word masked with p_mask, else replaced with p_replace; then,
    with p_ngram, only a random n-gram kept (n uniform in 1..5, at most the sentence's length)."""
    out = []
    for w in words:
        if rng.random() < p_mask:
            out.append(MASK)
        elif rng.random() < p_replace:
            out.append(unigram.other_than(w, rng))
        else:
            out.append(w)
    if out and rng.random() < p_ngram:
        n = min(rng.randint(1, LONGEST_NGRAM), len(out))
        start = rng.randint(0, len(out) - n)
        out = out[start:start + n]
    return out


def augment(sentences, copies, *, p_mask, p_replace, p_ngram, seed):
    """`copies` augmented sentences per sentence, drawn from `seed` (the same arguments give the same list);
    duplicates and sentences equal to any of `sentences` (normalised: case and spaces) are dropped, so the list
    may be shorter. Returns (sentences, how many draws were dropped)."""
    rng, unigram = random.Random(seed), Unigram(sentences)
    seen = {normalised(s) for s in sentences}
    out, dropped = [], 0
    for s in tqdm(sentences, desc="augmenting", leave=False, disable=None):
        words = s.split()
        for _ in range(copies):
            text = " ".join(augment_words(words, rng, unigram, p_mask, p_replace, p_ngram))
            key = normalised(text)
            if not key or key in seen:
                dropped += 1
                continue
            seen.add(key)
            out.append(text)
    return out, dropped
