"""The statistics behind the study's verdicts, against textbook values."""

import math

import pytest
from scipy import stats as sps

from fedlora.study.stats import at_upload, detectable_difference, holm, late_gain, mean_stderr, paired, verdict


def test_paired_interval_and_p_value_are_the_paired_t_tests():
    ours, theirs = [0.70, 0.72, 0.75, 0.71, 0.69], [0.66, 0.70, 0.70, 0.69, 0.68]
    p = paired(ours, theirs)
    diffs = [a - b for a, b in zip(ours, theirs)]
    ref = sps.ttest_rel(ours, theirs)
    assert p.mean == pytest.approx(sum(diffs) / 5) and p.p == pytest.approx(ref.pvalue, rel=1e-9)
    lo, hi = p.interval
    assert (hi - lo) / 2 == pytest.approx(sps.t.ppf(0.975, 4) * p.std / math.sqrt(5), rel=1e-9)
    assert (p.won, p.lost) == (5, 0)


def test_holm_adjustment():
    assert holm([0.01, 0.04, 0.03]) == pytest.approx([0.03, 0.06, 0.06])
    assert holm([0.5, 0.001]) == pytest.approx([0.5, 0.002])


@pytest.mark.parametrize("ours, theirs, adjusted, word", [
    ([0.70, 0.72, 0.75, 0.71, 0.69], [0.60, 0.61, 0.63, 0.62, 0.60], 0.001, "win"),
    ([0.60, 0.61, 0.63, 0.62, 0.60], [0.70, 0.72, 0.75, 0.71, 0.69], 0.001, "loss"),
    ([0.700, 0.701, 0.700, 0.701, 0.700], [0.700, 0.700, 0.701, 0.700, 0.701], 0.9, "tie"),
    ([0.70, 0.60, 0.75, 0.61, 0.69], [0.66, 0.66, 0.66, 0.66, 0.66], 0.6, "inconclusive"),
    ([0.70], [0.60], 1.0, "one seed: ahead"),
])
def test_verdict_words(ours, theirs, adjusted, word):
    assert verdict(paired(ours, theirs), adjusted, tie=0.005) == word


@pytest.mark.parametrize("ours, theirs, word, won", [
    ([1.50, 1.52, 1.49, 1.51, 1.50], [1.70, 1.69, 1.72, 1.71, 1.70], "win", 5),  # our loss is lower: ahead
    ([1.70, 1.69, 1.72, 1.71, 1.70], [1.50, 1.52, 1.49, 1.51, 1.50], "loss", 0),
    ([1.5], [1.7], "one seed: ahead", 1),
])
def test_for_a_loss_lower_is_ahead(ours, theirs, word, won):
    p = paired(ours, theirs, higher_is_better=False)
    assert p.mean == pytest.approx(sum(a - b for a, b in zip(ours, theirs)) / len(ours))  # still ours - theirs
    assert verdict(p, adjusted_p=0.001, tie=0.01, higher_is_better=False) == word and p.won == won
    assert p.won + p.lost == len(ours)


def test_mean_and_standard_error_over_seeds():
    mean, se = mean_stderr([1.0, 2.0, 4.0])
    assert mean == pytest.approx(7 / 3) and se == pytest.approx(sps.sem([1.0, 2.0, 4.0]))
    assert mean_stderr([3.0])[0] == 3.0 and math.isnan(mean_stderr([3.0])[1])


def test_detectable_difference_shrinks_with_seeds_and_matches_the_power_formula():
    d5 = detectable_difference(0.02, 5)
    assert d5 == pytest.approx((sps.t.ppf(0.975, 4) + sps.t.ppf(0.8, 4)) * 0.02 / math.sqrt(5))
    assert detectable_difference(0.02, 10) < d5 and math.isinf(detectable_difference(0.02, 1))


def test_accuracy_at_an_upload_budget_interpolates_between_evaluations():
    pts = [(0.0, 0.3), (10.0, 0.5), (20.0, 0.6)]
    assert at_upload(pts, 5.0) == pytest.approx(0.4) and at_upload(pts, 20.0) == pytest.approx(0.6)
    assert math.isnan(at_upload(pts, 25.0))


def test_late_gain_is_the_growth_over_the_last_third_of_the_rounds():
    assert late_gain([(0, 0.3), (3, 0.5), (6, 0.6), (9, 0.62)]) == pytest.approx(0.02)
