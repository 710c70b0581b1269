"""study/stats.py: paired and Welch intervals of a difference, and the minimum detectable effect."""
from __future__ import annotations

import math

import pytest

from loralab.study.stats import Stat, difference, paired_seeds, t_quantile
from loralab.study.verdicts import judge

A = [0.91, 0.84, 1.02, 0.95, 0.88]
B = [0.97, 0.89, 1.10, 0.99, 0.95]   # B = A + a small, seed-consistent shift: pairing sees it


def _stat(values, seeds=None):
    return Stat(list(values), list(seeds) if seeds is not None else None)


def test_paired_interval_closed_form():
    """The paired interval of A - B: mean and t(0.975, 4) * sd / sqrt(5) of the per-seed differences,
    computed here by hand (t(0.975, 4) = 2.776445)."""
    d = [a - b for a, b in zip(A, B)]
    mean = sum(d) / 5
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / 4)
    diff = difference(_stat(A, range(1, 6)), _stat(B, range(1, 6)))
    assert diff.test == "paired" and diff.n == 5 and diff.df == 4
    assert diff.d == pytest.approx(mean) and diff.hw == pytest.approx(2.776445 * sd / math.sqrt(5), rel=1e-6)
    assert diff.hw < difference(_stat(A), _stat(B)).hw / 5  # the shared noise cancels


def test_paired_and_welch_match_scipy():
    stats = pytest.importorskip("scipy.stats")
    d = [a - b for a, b in zip(A, B)]
    ref = stats.ttest_rel(A, B).confidence_interval(0.95)
    diff = difference(_stat(A, range(5)), _stat(B, range(5)))
    assert (diff.d - diff.hw, diff.d + diff.hw) == pytest.approx((ref.low, ref.high), rel=1e-7)
    assert diff.d == pytest.approx(sum(d) / 5)
    # Welch (different seeds): scipy's Welch with fractional df; ours floors df (conservative, wider)
    w = difference(_stat(A, [1, 2, 3, 4, 5]), _stat(B, [6, 7, 8, 9, 10]))
    ref_w = stats.ttest_ind(A, B, equal_var=False).confidence_interval(0.95)
    assert w.test == "Welch" and w.d == pytest.approx((ref_w.low + ref_w.high) / 2)
    assert ref_w.high - ref_w.low <= 2 * w.hw <= (ref_w.high - ref_w.low) * 1.05


def test_pairing_needs_the_same_seeds_on_both_sides():
    assert paired_seeds(_stat(A, [1, 2, 3, 4, 5]), _stat(B, [5, 4, 3, 2, 1])) == [1, 2, 3, 4, 5]
    assert paired_seeds(_stat(A[:4], [1, 2, 3, 4]), _stat(B, [1, 2, 3, 4, 5])) == [1, 2, 3, 4]  # the common ones
    assert paired_seeds(_stat(A[:2], [1, 2]), _stat(B[:2], [2, 3])) is None             # one common seed: Welch
    assert paired_seeds(_stat(A), _stat(B)) is None                                    # seeds unknown
    assert paired_seeds(_stat(A[:1], [1]), _stat(B[:1], [1])) is None                  # one pair: no interval
    # pairing follows the seed, not the order the values arrived in
    rev = difference(_stat(A, [1, 2, 3, 4, 5]), _stat(B[::-1], [5, 4, 3, 2, 1]))
    assert rev.d == pytest.approx(difference(_stat(A, range(5)), _stat(B, range(5))).d)
    assert rev.hw == pytest.approx(difference(_stat(A, range(5)), _stat(B, range(5))).hw)


def test_minimum_detectable_effect_closed_form():
    """(t(0.975, df) + t(0.8, df)) * se: df 4 -> 2.776445 + 0.940965."""
    diff = difference(_stat(A, range(5)), _stat(B, range(5)))
    assert diff.mde() == pytest.approx((2.776445 + 0.940965) * diff.se, rel=1e-5)
    s = Stat([1.0, 2.0, 3.0, 4.0])
    assert s.mde() == pytest.approx((3.182446 + 0.978472) * s.std / 2, rel=1e-5)
    assert math.isnan(Stat([1.0]).mde())


# --- the t quantile, one cell's interval, the verdicts ------------------------------------------------------

@pytest.mark.parametrize("df, expected", [(1, 12.7062), (2, 4.3027), (3, 3.1824), (4, 2.7764), (5, 2.5706),
                                          (9, 2.2622), (10, 2.2281), (29, 2.0452), (30, 2.0423)])
def test_t_quantile_matches_the_table(df, expected):
    assert t_quantile(0.975, df) == pytest.approx(expected, abs=1e-4)


def test_t_quantile_approaches_the_normal():
    assert t_quantile(0.975, 10_000) == pytest.approx(1.95996, abs=1e-3)
    assert t_quantile(0.95, 1) == pytest.approx(6.3138, abs=1e-4)  # another p: 0.95 one-sided, df 1


def test_stat_mean_std_interval_closed_form():
    s = Stat([1.0, 2.0, 3.0, 4.0])
    assert s.mean == 2.5
    assert s.std == pytest.approx(math.sqrt(5 / 3))  # sample std, ddof=1
    hw = 3.182446305 * math.sqrt(5 / 3) / 2          # t(0.975, 3) * std / sqrt(4)
    assert s.ci == pytest.approx((2.5 - hw, 2.5 + hw))
    one = Stat([7.0])
    assert one.mean == 7.0 and math.isnan(one.std) and math.isnan(one.half_width)


def test_judge_verdicts():
    stats = {"a": {"m": Stat([1.0, 1.1, 0.9])}, "b": {"m": Stat([2.0, 2.1, 1.9])}, "c": {"m": Stat([1.05, 1.0, 1.1])}}
    assert judge({"check": "lower", "a": "a", "b": "b", "metric": "m"}, stats)[1] == "agree"
    assert judge({"check": "higher", "a": "a", "b": "b", "metric": "m"}, stats)[1] == "disagree"
    assert judge({"check": "lower", "a": "a", "b": "c", "metric": "m"}, stats)[1] == "unclear"  # inside the noise
    # similar is equivalence: the whole interval of the difference (-0.05 +- 0.28) inside the tolerance
    assert judge({"check": "similar", "a": "a", "b": "c", "metric": "m", "rel_tol": 0.4}, stats)[1] == "agree"
    assert judge({"check": "similar", "a": "a", "b": "c", "metric": "m", "rel_tol": 0.1}, stats)[1] == "unclear"
    assert judge({"check": "similar", "a": "a", "b": "b", "metric": "m", "tol": 0.5}, stats)[1] == "disagree"
    above = {"check": "above", "cell": "b", "metric": "m", "value": 1.5}
    assert judge(above, stats)[1] == "agree" and judge({**above, "value": 2.0}, stats)[1] == "unclear"
    assert judge({**above, "value": 2.5}, stats)[1] == "disagree"
    assert judge({"check": "below", "cell": "a", "metric": "m", "value": 1.5}, stats)[1] == "agree"
    stats["b"]["best"] = Stat([1.0, 1.0, 1.0])  # b may be another metric, named in the measurement
    assert judge({"check": "lower", "a": "a", "b": "b", "metric": "m", "metric_b": "best"}, stats)[0].startswith(
        "a 1 ± 0.1 vs b best 1 ± 0")
    assert judge({"check": "consistent", "cell": "a", "metric": "m", "max_cv": 0.05}, stats)[1] == "disagree"
    assert judge({"check": "consistent", "cell": "a", "metric": "m", "max_cv": 0.2}, stats)[1] == "agree"
    best = {"check": "best", "cell": "a", "metric": "m", "direction": "min", "cells": ["a", "b"]}
    assert judge(best, stats)[1] == "agree"
    ordered = {"check": "ordered", "cells": ["a", "b"], "metric": "m", "direction": "increasing"}
    assert judge(ordered, stats)[1] == "agree"
    assert judge({"check": "ratio", "a": "b", "b": "a", "metric": "m", "expect": 2.0, "tol": 0.05}, stats)[1] == "agree"
    assert judge({"check": "lower", "a": "a", "b": "gone", "metric": "m"}, stats)[1] == "not measured"
