"""Hand-computed checks of apo_ray.core.metrics."""

import math

import numpy as np
import pytest
import torch

from apo_ray.core.metrics import (
    calibration_errors,
    combine_verdicts,
    mean_and_stderr,
    mean_difference_interval,
    paired_bootstrap,
    parse_judge_verdict,
    preference_accuracy,
    proportion_interval,
    rm_difference_interval,
    samples_to_decide,
    summarize_judgements,
    weighted_ece,
)

# ----------------------------------------------------------------------------- accuracy


def test_preference_accuracy_tie_counts_as_wrong():
    # pair 0: 1 > 0 right; pair 1: 2 == 2 tie -> wrong; pair 2: 3 < 4 wrong -> 1/3
    assert preference_accuracy([1.0, 2.0, 3.0], [0.0, 2.0, 4.0]) == pytest.approx(1 / 3)


@pytest.mark.parametrize("kind", ["list", "numpy", "torch", "torch_bf16"])
def test_preference_accuracy_accepts_several_input_types(kind):
    good, bad = [1.0, 2.0, 3.0, 5.0], [0.0, 3.0, 1.0, 4.0]  # right, wrong, right, right
    conv = {
        "list": lambda x: x,
        "numpy": np.array,
        "torch": torch.tensor,
        "torch_bf16": lambda x: torch.tensor(x, dtype=torch.bfloat16, requires_grad=True),
    }[kind]
    acc = preference_accuracy(conv(good), conv(bad))
    assert isinstance(acc, float)
    assert acc == pytest.approx(0.75)


def test_preference_accuracy_rejects_mismatched_or_empty():
    with pytest.raises(ValueError):
        preference_accuracy([1.0, 2.0], [1.0])
    with pytest.raises(ValueError):
        preference_accuracy([], [])


# ----------------------------------------------------------------------------- calibration


def test_calibration_three_pairs_by_hand():
    # margins chosen so that sigmoid gives round probabilities away from bin edges:
    #   d = 0          -> p = 0.5
    #   d = ln 3       -> p = 3 / 4 = 0.75
    #   d = ln(17 / 3) -> p = 17 / 20 = 0.85
    r_good = [0.0, math.log(3.0), math.log(17.0 / 3.0)]
    r_bad = [0.0, 0.0, 0.0]
    # 2N = 6 predictions (p, y) -> bin = min(int(p * 10), 9):
    #   (0.50, 1) -> 5    (0.50, 0) -> 5
    #   (0.75, 1) -> 7    (0.25, 0) -> 2
    #   (0.85, 1) -> 8    (0.15, 0) -> 1
    # per bin: sum(p - y), mean p, mean y, |mean p - mean y|
    #   bin 1: 0.15 - 0 = 0.15,           0.15, 0.0, 0.15
    #   bin 2: 0.25 - 0 = 0.25,           0.25, 0.0, 0.25
    #   bin 5: (0.5 + 0.5) - (1 + 0) = 0, 0.50, 0.5, 0.00
    #   bin 7: 0.75 - 1 = -0.25,          0.75, 1.0, 0.25
    #   bin 8: 0.85 - 1 = -0.15,          0.85, 1.0, 0.15
    # ece = (0.15 + 0.25 + 0 + 0.25 + 0.15) / 6 = 0.8 / 6
    # ace = (0.15 + 0.25 + 0 + 0.25 + 0.15) / 5 = 0.16   (5 non-empty bins)
    # mce = 0.25
    out = calibration_errors(r_good, r_bad, n_bins=10)
    assert out["ece"] == pytest.approx(0.8 / 6)
    assert out["ace"] == pytest.approx(0.16)
    assert out["mce"] == pytest.approx(0.25)
    assert out["n_predictions"] == 6

    bins = out["bins"]
    assert len(bins) == 10
    assert [b["count"] for b in bins] == [0, 1, 1, 0, 0, 2, 0, 1, 1, 0]
    assert bins[0] == {"lo": 0.0, "hi": 0.1, "count": 0, "mean_predicted": None, "observed": None}
    assert bins[5]["lo"] == pytest.approx(0.5) and bins[5]["hi"] == pytest.approx(0.6)
    assert bins[5]["mean_predicted"] == pytest.approx(0.5)
    assert bins[5]["observed"] == pytest.approx(0.5)
    assert bins[7]["mean_predicted"] == pytest.approx(0.75)
    assert bins[7]["observed"] == pytest.approx(1.0)
    assert bins[1]["mean_predicted"] == pytest.approx(0.15)
    assert bins[1]["observed"] == pytest.approx(0.0)
    assert bins[9]["hi"] == pytest.approx(1.0)


def test_calibration_probability_one_lands_in_last_bin():
    # d = 100 -> p = 1.0 exactly in float64; int(1.0 * 10) = 10 is clamped to bin 9
    out = calibration_errors([100.0], [0.0], n_bins=10)
    assert out["bins"][9]["count"] == 1
    assert out["bins"][0]["count"] == 1  # the flipped orientation, 1 - p = 0
    assert out["ece"] == pytest.approx(0.0, abs=1e-12)


def test_ace_differs_from_ece_on_uneven_bins():
    # 9 pairs with d = 0 and one with d = ln 3.
    # predictions: 18 x 0.5 (9 labelled 1, 9 labelled 0) -> bin 5, sum(p - y) = 9 - 9 = 0, gap 0
    #              (0.75, 1) -> bin 7: sum = -0.25, gap 0.25
    #              (0.25, 0) -> bin 2: sum = +0.25, gap 0.25
    # ece = (0 + 0.25 + 0.25) / 20 = 0.025 ; ace = (0 + 0.25 + 0.25) / 3 = 1 / 6
    r_good = [0.0] * 9 + [math.log(3.0)]
    r_bad = [0.0] * 10
    out = calibration_errors(r_good, r_bad)
    assert out["ece"] == pytest.approx(0.025)
    assert out["ace"] == pytest.approx(1 / 6)
    assert out["mce"] == pytest.approx(0.25)
    assert out["ace"] > 5 * out["ece"]


def _synthetic_pairs(n: int, scale: float, seed: int = 0):
    """Pairs whose 'good' side is drawn with the true probability sigmoid(d).

    The RM reports margin ``scale * d``; scale 1 is perfectly calibrated, scale > 1 over-confident.
    """
    rng = np.random.default_rng(seed)
    d = rng.normal(0.0, 2.0, size=n)
    p = 1.0 / (1.0 + np.exp(-d))
    first_wins = rng.random(n) < p
    # if the first response wins, (good, bad) = (d, 0); otherwise the second is the good one
    r_good = np.where(first_wins, scale * d, 0.0)
    r_bad = np.where(first_wins, 0.0, scale * d)
    return r_good, r_bad


def test_calibration_perfectly_calibrated_synthetic_has_small_ece():
    r_good, r_bad = _synthetic_pairs(20_000, scale=1.0)
    out = calibration_errors(r_good, r_bad)
    assert out["ece"] < 0.02
    assert out["mce"] < 0.05


def test_calibration_over_confident_synthetic_has_large_ece():
    # same data but margins tripled: predictions are too extreme
    r_good, r_bad = _synthetic_pairs(20_000, scale=3.0)
    out = calibration_errors(r_good, r_bad)
    assert out["ece"] > 0.05


def test_calibration_depends_only_on_margins_and_rejects_bad_args():
    out = calibration_errors([1.0, -2.0, 0.3], [0.0, 0.5, 0.1])
    # adding a constant to both rewards (BT is shift invariant) and reordering pairs change nothing
    shifted = calibration_errors([0.3 + 7, 1.0 + 7, -2.0 + 7], [0.1 + 7, 0.0 + 7, 0.5 + 7])
    assert out["ece"] == pytest.approx(shifted["ece"])
    assert out["ace"] == pytest.approx(shifted["ace"])
    # swapping good and bad is a different (worse) RM: margins [1, -2.5, 0.2] mostly right -> wrong
    swapped = calibration_errors([0.0, 0.5, 0.1], [1.0, -2.0, 0.3])
    assert swapped["ece"] != pytest.approx(out["ece"])
    with pytest.raises(ValueError):
        calibration_errors([1.0], [0.0], n_bins=0)
    with pytest.raises(ValueError):
        calibration_errors([], [])


# ----------------------------------------------------------------------------- mean / stderr


def test_mean_and_stderr_hand_computed():
    # mean 2.5; sample variance = (1.5^2 + 0.5^2 + 0.5^2 + 1.5^2) / 3 = 5 / 3
    # stderr = sqrt(5 / 3) / sqrt(4)
    m, se = mean_and_stderr(torch.tensor([1.0, 2.0, 3.0, 4.0]))
    assert m == pytest.approx(2.5)
    assert se == pytest.approx(math.sqrt(5 / 3) / 2)
    assert isinstance(m, float) and isinstance(se, float)


def test_mean_and_stderr_edge_cases():
    m, se = mean_and_stderr([7.0])
    assert m == 7.0 and math.isnan(se)
    with pytest.raises(ValueError):
        mean_and_stderr([])


# ----------------------------------------------------------------------------- judge parsing


@pytest.mark.parametrize(
    "text, expected",
    [
        ("[A] is better", "A"),
        ("[B] is better", "B"),
        ("equally good", "same"),
        ("equally bad", "same"),
        ("**[A] is better**", "A"),
        ("*[B] is better*", "B"),
        ("`equally good`", "same"),
        ("[B] is better.", "B"),
        ("**[A] is better.**", "A"),
        ("[a] IS BETTER", "A"),
        ("Equally Bad.", "same"),
        ("   [B] is better   \n\n  \n", "B"),
        (
            (
                "Response A answers directly and accurately.\n"
                "Response B is vague and mentions [B] is better formatting.\n\n"
                "Both are harmless.\n"
                "[A] is better"
            ),
            "A",
        ),
        # the verdict must be the LAST non-empty line
        ("[A] is better\nBut on reflection I am not sure.", "invalid"),
        ("A is better", "invalid"),
        ("[C] is better", "invalid"),
        ("I think [A] is better", "invalid"),
        ("asdf qwerty", "invalid"),
        ("", "invalid"),
        ("\n  \n", "invalid"),
    ],
)
def test_parse_judge_verdict(text, expected):
    assert parse_judge_verdict(text) == expected


# ----------------------------------------------------------------------------- verdict combination

# (first with A = ours, second asked with positions swapped so its "A" = theirs) -> outcome
COMBINATION_TABLE = [
    # second "B" means theirs-in-B-position lost -> ours better: both prefer ours
    ("A", "B", "win"),
    ("B", "A", "loss"),  # both prefer theirs
    ("same", "same", "tie"),
    ("A", "same", "win"),  # one ours + one same
    ("same", "B", "win"),  # same + (swapped B = ours)
    ("B", "same", "loss"),  # one theirs + one same
    ("same", "A", "loss"),  # same + (swapped A = theirs)
    ("A", "A", "inconsistent"),  # the judge picks position A both times: A vs B disagreement
    ("B", "B", "inconsistent"),
    ("invalid", "A", "invalid"),
    ("invalid", "B", "invalid"),
    ("invalid", "same", "invalid"),
    ("A", "invalid", "invalid"),
    ("B", "invalid", "invalid"),
    ("same", "invalid", "invalid"),
    ("invalid", "invalid", "invalid"),
]


@pytest.mark.parametrize("first, second_swapped, expected", COMBINATION_TABLE)
def test_combine_verdicts_table(first, second_swapped, expected):
    assert combine_verdicts(first, second_swapped) == expected


def test_combination_table_covers_all_verdict_pairs():
    verdicts = ["A", "B", "same", "invalid"]
    assert {(f, s) for f, s, _ in COMBINATION_TABLE} == {(f, s) for f in verdicts for s in verdicts}


def test_combine_verdicts_rejects_unknown_strings():
    with pytest.raises(ValueError):
        combine_verdicts("win", "A")
    with pytest.raises(ValueError):
        combine_verdicts("A", "[A] is better")


def test_parse_then_combine_end_to_end():
    first = parse_judge_verdict("Reasons...\n**[A] is better**")
    second = parse_judge_verdict("Reasons...\n[B] is better.")  # swapped: B is ours
    assert combine_verdicts(first, second) == "win"


# ----------------------------------------------------------------------------- summary


def test_summarize_judgements_counts_and_rates():
    outcomes = ["win", "win", "tie", "loss", "inconsistent", "invalid"]
    s = summarize_judgements(outcomes)
    assert s["n"] == 6
    assert (s["win"], s["tie"], s["loss"], s["inconsistent"], s["invalid"]) == (2, 1, 1, 1, 1)
    assert s["win_rate"] == pytest.approx(2 / 6)
    assert s["tie_rate"] == pytest.approx(1 / 6)
    assert s["loss_rate"] == pytest.approx(1 / 6)
    assert s["inconsistent_rate"] == pytest.approx(1 / 6)
    assert s["invalid_rate"] == pytest.approx(1 / 6)


def test_summarize_judgements_empty_and_unknown():
    s = summarize_judgements([])
    assert s["n"] == 0 and s["win"] == 0 and math.isnan(s["win_rate"])
    with pytest.raises(ValueError):
        summarize_judgements(["win", "A"])


# ----------------------------------------------------------------------------- intervals


def test_weighted_ece_equals_calibration_errors_row_by_row():
    rng = np.random.default_rng(3)
    good, bad = rng.normal(size=(5, 30)) * 3, rng.normal(size=(5, 30))
    batched = weighted_ece(good, bad, n_bins=7)
    assert batched.shape == (5,)
    for row in range(5):
        assert batched[row] == pytest.approx(calibration_errors(good[row], bad[row], n_bins=7)["ece"], abs=1e-12)


def test_paired_bootstrap_two_items_by_hand():
    # differences d = [1, 0]: a resample of 2 items has mean 0 (prob 1/4), 0.5 (1/2) or 1 (1/4),
    # so the 2.5th and 97.5th percentiles are 0 and 1; the spread of the resampled mean is
    # sqrt(population var 0.25 / 2) = 0.3536.
    out = mean_difference_interval([1.0, 0.0], [0.0, 0.0], n_resamples=4000, seed=1)
    assert out["estimate"] == pytest.approx(0.5)
    assert (out["low"], out["high"]) == (0.0, 1.0)
    assert out["se"] == pytest.approx(math.sqrt(0.125), abs=0.02)
    assert out["n"] == 2 and out["n_resamples"] == 4000


def test_paired_difference_of_known_sign_and_size():
    # per-prompt differences 1, 2, 3, 4 (policy x above y on every prompt): mean 2.5; every
    # resample's mean lies in [1, 4], so the interval does too and excludes 0.
    x, y = [11.0, -3.0, 7.0, 0.5], [10.0, -5.0, 4.0, -3.5]
    out = mean_difference_interval(x, y, seed=0)
    assert out["estimate"] == pytest.approx(2.5)
    assert 1.0 <= out["low"] < 2.5 < out["high"] <= 4.0
    flipped = mean_difference_interval(y, x, seed=0)
    assert flipped["estimate"] == pytest.approx(-2.5)
    assert (flipped["low"], flipped["high"]) == pytest.approx((-out["high"], -out["low"]))


def test_pairing_cancels_what_the_items_share():
    # Two policies whose scores differ by exactly 0.25 on every prompt, over prompts that vary by
    # +-100: the paired interval is the single point 0.25 (an unpaired one would span ~+-10).
    noise = np.random.default_rng(0).normal(size=200) * 100
    out = mean_difference_interval(noise + 0.25, noise, seed=0)
    assert out["estimate"] == pytest.approx(0.25)
    assert out["low"] == pytest.approx(0.25) and out["high"] == pytest.approx(0.25)
    assert out["se"] == pytest.approx(0.0, abs=1e-9)


def test_rm_accuracy_difference_by_hand():
    # 40 test pairs: RM A ranks all 40 right, RM B the first 20 -> A - B = 0.5; per pair the
    # difference is 1 (20 pairs) or 0 (20 pairs), so the resampled mean has sd sqrt(.25 / 40) = 0.079.
    good_a, bad_a = np.ones(40), np.zeros(40)
    good_b, bad_b = np.r_[np.ones(20), np.zeros(20)], np.r_[np.zeros(20), np.ones(20)]
    out = rm_difference_interval(good_a, bad_a, good_b, bad_b, metric="acc", seed=0)
    assert out["estimate"] == pytest.approx(0.5)
    assert out["se"] == pytest.approx(math.sqrt(0.25 / 40), rel=0.1)
    assert 0.3 < out["low"] < 0.5 < out["high"] < 0.7
    same = rm_difference_interval(good_b, bad_b, good_b, bad_b, metric="acc")
    assert (same["estimate"], same["low"], same["high"]) == (0.0, 0.0, 0.0)


def test_rm_ece_difference_by_hand():
    # RM A: margin 0 on every pair -> p = 0.5 for both orientations, residuals +0.5 and -0.5 in
    # one bin cancel: ECE 0. RM B: margin -50 on every pair (confidently wrong) -> p ~ 0 with
    # label 1 and p ~ 1 with label 0: ECE 1. A - B = -1 on every resample.
    n = 12
    zeros = np.zeros(n)
    out = rm_difference_interval(zeros, zeros, zeros, np.full(n, 50.0), metric="ece", seed=0)
    assert out["estimate"] == pytest.approx(-1.0)
    assert out["low"] == pytest.approx(-1.0) and out["high"] == pytest.approx(-1.0)


def test_bootstrap_is_seeded_and_checks_its_input():
    rng = np.random.default_rng(5)
    x, y = rng.normal(size=50), rng.normal(size=50)
    a, b = mean_difference_interval(x, y, seed=7), mean_difference_interval(x, y, seed=7)
    assert a == b
    c = mean_difference_interval(x, y, seed=8)
    assert (c["low"], c["high"]) != (a["low"], a["high"])
    with pytest.raises(ValueError, match="differ in length"):
        mean_difference_interval([1.0, 2.0], [1.0])
    with pytest.raises(ValueError, match="at least 2 items"):
        paired_bootstrap(lambda a, axis=-1: np.mean(a, axis=axis), [[1.0]])
    with pytest.raises(ValueError, match="metric"):
        rm_difference_interval(x, y, x, y, metric="auc")


def test_proportion_interval_is_wilson_by_hand():
    k, n, z = 7, 20, 1.959963984540054
    p = k / n
    centre = (p + z * z / (2 * n)) / (1 + z * z / n)
    half = z * math.sqrt(p * (1 - p) / n + z * z / (4 * n * n)) / (1 + z * z / n)
    out = proportion_interval(k, n)
    assert out["rate"] == pytest.approx(0.35)
    assert (out["low"], out["high"]) == pytest.approx((centre - half, centre + half))
    assert math.isnan(proportion_interval(0, 0)["rate"])
    with pytest.raises(ValueError):
        proportion_interval(5, 3)


def test_samples_to_decide_by_hand():
    # se 0.01 at n = 400, effect 0.01: n * (1.95996 + 0.84162)^2 = 400 * 7.8489 = 3139.6
    assert samples_to_decide(0.01, 0.01, 400) == pytest.approx(3139.55, rel=1e-4)
    assert samples_to_decide(-0.02, 0.01, 400) == pytest.approx(3139.55 / 4, rel=1e-4)  # sign does not matter
    assert samples_to_decide(0.0, 0.01, 400) == math.inf
