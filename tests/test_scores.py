"""DD-Ranking's scores on hand-computed inputs: HLR and IOR from stubbed accuracies, LRS and ARS in both
scalings, pairing by repeat, and bad settings refused."""

import math

import pytest

from memdistill.errors import UserError
from memdistill.scores import (augmentation_robust_score, exp_score, hard_label_recovery, improvement_over_random,
                               label_robust_score, score_repeats)

E, INV_E = math.e, math.exp(-1)


def test_exp_score_ends_and_middle():
    assert exp_score(-1) == pytest.approx(0.0, abs=1e-12)
    assert exp_score(1) == pytest.approx(1.0)
    assert exp_score(0) == pytest.approx((1 - INV_E) / (E - INV_E))


def test_hlr_and_ior_in_points():
    assert hard_label_recovery(full_acc=97.5, set_acc=60.0) == pytest.approx(37.5)
    assert improvement_over_random(set_acc=60.0, random_acc=52.0) == pytest.approx(8.0)
    assert improvement_over_random(set_acc=40.0, random_acc=52.0) == pytest.approx(-12.0)


def test_lrs_on_fractions_by_hand():
    # HLR 40 points, IOR 10 points, w 0.5: a = 0.5 * 0.10 - 0.5 * 0.40 = -0.15
    expected = (math.exp(-0.15) - INV_E) / (E - INV_E)
    assert label_robust_score(40.0, 10.0) == pytest.approx(expected)
    assert label_robust_score(40.0, 10.0, scaling="fraction") == pytest.approx(0.2097, abs=1e-4)  # (0.8607 - 0.3679) / 2.3504
    # w 0.8: a = 0.8 * 0.10 - 0.2 * 0.40 = 0 exactly
    assert label_robust_score(40.0, 10.0, weight=0.8) == pytest.approx(exp_score(0.0))


def test_lrs_on_points_as_ddranking_code():
    # Same inputs in points: a = 0.5 * 10 - 0.5 * 40 = -15
    expected = (math.exp(-15) - INV_E) / (E - INV_E)
    assert label_robust_score(40.0, 10.0, scaling="points") == pytest.approx(expected)
    # Small differences: HLR 0.4, IOR 1.0 points, a = 0.5 - 0.2 = 0.3
    assert label_robust_score(0.4, 1.0, scaling="points") == pytest.approx((math.exp(0.3) - INV_E) / (E - INV_E))


def test_ars_by_hand_both_scalings():
    # with augmentation the set beats random by 6 points, without by 2: a = 0.5 * 0.06 + 0.5 * 0.02 = 0.04
    assert augmentation_robust_score(6.0, 2.0) == pytest.approx((math.exp(0.04) - INV_E) / (E - INV_E))
    # lam 0.25 on points: a = 0.25 * 6 + 0.75 * 2 = 3
    assert augmentation_robust_score(6.0, 2.0, lam=0.25, scaling="points") == pytest.approx(
        (math.exp(3) - INV_E) / (E - INV_E))


def test_score_repeats_pairs_each_repeat_then_averages():
    # Stubbed accuracies of two repeats (seed s and s+1): set, full data, random real.
    result = score_repeats(set_acc=[60.0, 70.0], full_acc=[98.0, 96.0], random_acc=[50.0, 54.0])
    assert result["hlr"]["per_repeat"] == pytest.approx([38.0, 26.0])
    assert result["ior"]["per_repeat"] == pytest.approx([10.0, 16.0])
    assert result["hlr"]["mean"] == pytest.approx(32.0) and result["hlr"]["std"] == pytest.approx(math.sqrt(72))
    assert result["ior"]["mean"] == pytest.approx(13.0) and result["ior"]["std"] == pytest.approx(math.sqrt(18))
    lrs = [exp_score(0.5 * 0.10 - 0.5 * 0.38), exp_score(0.5 * 0.16 - 0.5 * 0.26)]
    assert result["lrs"]["per_repeat"] == pytest.approx(lrs)
    assert result["lrs"]["mean"] == pytest.approx(sum(lrs) / 2)
    assert result["scaling"] == "fraction" and result["weight"] == 0.5 and "ars" not in result


def test_score_repeats_with_ars_when_both_settings_measured():
    result = score_repeats([60.0], [98.0], [50.0], set_noaug=[45.0], random_noaug=[41.0], scaling="points")
    # with: 60 - 50 = 10, without: 45 - 41 = 4 (points), a = 7
    assert result["ars"]["per_repeat"] == pytest.approx([exp_score(7.0)])
    assert result["ars"]["std"] == 0.0 and result["ars_lambda"] == 0.5
    assert result["lrs"]["mean"] == pytest.approx(exp_score(0.5 * 10 - 0.5 * 38))


@pytest.mark.parametrize("call, option", [
    (lambda: label_robust_score(10, 5, weight=1.5), "--lrs-weight"),
    (lambda: label_robust_score(10, 5, weight=float("nan")), "--lrs-weight"),
    (lambda: label_robust_score(10, 5, scaling="percent"), "--score-scaling"),
    (lambda: augmentation_robust_score(1, 2, lam=-0.1), "--ars-lambda"),
    (lambda: score_repeats([1.0], [2.0], [0.5], scaling="log"), "--score-scaling"),
])
def test_bad_settings_are_refused_naming_the_option(call, option):
    with pytest.raises(UserError, match=option):
        call()


def test_unpaired_repeats_are_a_programming_error():
    with pytest.raises(ValueError, match="pair"):
        score_repeats([60.0, 61.0], [98.0], [50.0, 51.0])
