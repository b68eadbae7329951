"""Intervals and the paired test against textbook cases and SciPy."""
import pytest
from scipy.stats import binomtest, bootstrap
import torch

from conftest import COLA_DEV, COLA_DEV_ACCEPTABLE, COLA_OOD
from training.metrics import bootstrap_mcc, matthews_corrcoef, mcnemar_exact, wilson_interval


def test_wilson_textbook_case():
    # Newcombe (1998), example: 81 successes of 263 -> 0.2553 to 0.3662
    low, high = wilson_interval(81, 263)
    assert (round(low, 4), round(high, 4)) == (0.2553, 0.3662)


@pytest.mark.parametrize("k, n", [(0, 10), (10, 10), (COLA_DEV_ACCEPTABLE, COLA_DEV), (1, 2), (500, COLA_OOD)])
def test_wilson_matches_scipy(k, n):
    ci = binomtest(k, n).proportion_ci(confidence_level=0.95, method="wilson")
    assert wilson_interval(k, n) == pytest.approx((ci.low, ci.high), abs=1e-9)


def test_mcnemar_textbook_case():
    # 1 sentence right only with A, 9 only with B: p = 2 * (C(10,0) + C(10,1)) / 2^10
    a = torch.tensor([1] * 1 + [0] * 9 + [1] * 20)
    b = torch.tensor([0] * 1 + [1] * 9 + [1] * 20)
    assert mcnemar_exact(a, b) == (1, 9, pytest.approx(22 / 1024))
    assert mcnemar_exact(a, a) == (0, 0, 1.0)


@pytest.mark.parametrize("only_a, only_b", [(3, 12), (7, 7), (0, 5), (40, 25)])
def test_mcnemar_matches_scipy_binomial(only_a, only_b):
    a = torch.tensor([1] * only_a + [0] * only_b + [0] * 30)
    b = torch.tensor([0] * only_a + [1] * only_b + [0] * 30)
    assert mcnemar_exact(a, b)[2] == pytest.approx(binomtest(only_a, only_a + only_b, 0.5).pvalue, abs=1e-12)


def test_bootstrap_mcc_is_seeded_and_agrees_with_scipy():
    g = torch.Generator().manual_seed(0)
    labels = torch.randint(0, 2, (COLA_DEV,), generator=g)  # the size of CoLA's dev set
    preds = torch.where(torch.rand(COLA_DEV, generator=g) < 0.8, labels, 1 - labels)
    ours = bootstrap_mcc(preds, labels, resamples=4000, seed=1)
    assert ours == bootstrap_mcc(preds, labels, resamples=4000, seed=1)
    assert ours[0] < matthews_corrcoef(preds, labels) < ours[1]
    ref = bootstrap((preds.numpy(), labels.numpy()), lambda p, y: matthews_corrcoef(p, y), paired=True,
                    vectorized=False, n_resamples=4000, method="percentile", random_state=0).confidence_interval
    assert ours == pytest.approx((ref.low, ref.high), abs=0.02)


def test_bootstrap_of_perfect_and_constant_predictions():
    labels = torch.tensor([0, 1] * 50)
    assert bootstrap_mcc(labels, labels) == (1.0, 1.0)
    assert bootstrap_mcc(torch.ones(100, dtype=torch.long), labels) == (0.0, 0.0)
