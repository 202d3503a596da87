"""apo_ray.core.inference: crossed seed x item intervals, Holm, one verdict rule, power; numbers by hand."""

from __future__ import annotations

import math

import pytest
from scipy import stats

from apo_ray.core.inference import (
    Components,
    crossed_components,
    crossed_interval,
    holm,
    items_needed,
    power,
    seeds_needed,
    verdict,
)

# Three seeds' A - B on the same 100 items: 0.10, 0.04, 0.07 (mean 0.07, sample variance 0.0009);
# each seed's item-bootstrap variance 0.0004, the mean-over-seeds' item-bootstrap variance 0.0002.
PER_SEED, WITHIN, POOLED, N = [0.10, 0.04, 0.07], [0.0004] * 3, 0.0002, 100


def test_components_split_the_interaction_out_of_both_observed_variances():
    c = crossed_components(PER_SEED, WITHIN, POOLED, N)
    # sigma2_int / N = 3 (0.0004 - 0.0002) / 2 = 0.0003; sigma2_item / N = 0.0004 - 0.0003 = 0.0001;
    # sigma2_seed = 0.0009 - 0.0003 = 0.0006
    assert c.var_int == pytest.approx(0.03) and c.var_item == pytest.approx(0.01)
    assert c.var_seed == pytest.approx(0.0006)
    # Var(mean) = 0.0006/3 + 0.01/100 + 0.03/300 = 0.0004 = s2/k + sigma2_item/N (= 0.0003 + 0.0001)
    assert c.se() == pytest.approx(0.02)
    # The old pooled se counted the interaction twice: sqrt(0.0002 + 0.0009/3) = 0.02236 > 0.02
    assert math.sqrt(POOLED + 0.0009 / 3) > c.se()
    # Satterthwaite: (0.0003 + 0.0001)^2 / (0.0003^2 / 2 + 0.0001^2 / 99) = 3.5476
    assert c.df() == pytest.approx(1.6e-7 / (0.0003 ** 2 / 2 + 0.0001 ** 2 / 99))
    assert 2 < c.df() < 4


def test_interval_uses_t_with_the_satterthwaite_df_not_1_96():
    out = crossed_interval(PER_SEED, WITHIN, POOLED, N)
    df = 1.6e-7 / (0.0003 ** 2 / 2 + 0.0001 ** 2 / 99)
    t = stats.t.ppf(0.975, df)
    assert t > 2.9  # vs 1.96: the seed term, with 2 df, dominates
    assert out["estimate"] == pytest.approx(0.07)
    assert (out["low"], out["high"]) == pytest.approx((0.07 - t * 0.02, 0.07 + t * 0.02))
    assert out["p"] == pytest.approx(2 * stats.t.sf(0.07 / 0.02, df))
    # where the seeds agree exactly, only the item term is left, with N - 1 df
    flat = crossed_interval([0.05, 0.05, 0.05], [0.0004] * 3, 0.0004, N)
    assert flat["components"]["var_seed"] == pytest.approx(0, abs=1e-15) and flat["components"]["var_int"] == 0
    assert flat["se"] == pytest.approx(0.02) and flat["df"] == pytest.approx(99)


def test_one_seed_leaves_the_seed_noise_unmeasured():
    out = crossed_interval([0.07], [0.0004], 0.0004, N)
    assert math.isnan(out["se"]) and math.isnan(out["p"]) and math.isnan(out["components"]["var_seed"])
    assert verdict(out["estimate"], out["p"], +1) == "undecided"


def test_holm_step_down_by_hand():
    # sorted: 0.005*4 = 0.02, 0.01*3 = 0.03, 0.03*2 = 0.06, 0.04*1 = 0.04 -> running max 0.06
    assert holm([0.01, 0.04, 0.03, 0.005]) == pytest.approx([0.03, 0.06, 0.06, 0.02])
    adjusted = holm([0.01, float("nan"), 0.04])  # a claim not measured is not a test
    assert adjusted[0] == pytest.approx(0.02) and math.isnan(adjusted[1]) and adjusted[2] == pytest.approx(0.04)
    assert holm([0.6, 0.7]) == [1.0, 1.0]


def test_one_rule_for_held_and_not_held():
    assert verdict(+0.03, 0.01, +1) == "held" and verdict(-0.03, 0.01, +1) == "not held"
    assert verdict(-0.03, 0.01, -1) == "held" and verdict(+0.03, 0.01, -1) == "not held"
    assert verdict(+0.03, 0.05, +1) == verdict(-0.03, 0.2, +1) == "undecided"


def test_power_and_seeds_needed_match_the_one_sample_t_test():
    # Seed noise only (sd 1), effect 1: the textbook one-sample t test needs n = 10 for 80% power
    # (power 0.803 at 10, 0.748 at 9; two-sided 5%).
    seeds_only = Components(var_seed=1.0, var_item=0.0, var_int=0.0, k=3, n=400)
    assert power(1.0, seeds_only, 10, 400) == pytest.approx(0.8031, abs=1e-3)
    assert power(1.0, seeds_only, 9, 400) == pytest.approx(0.748, abs=1e-3)
    assert seeds_needed(1.0, seeds_only, 400) == 10
    # Item noise only: se = sqrt(var_item / n); 2 seeds suffice when the items do, never when they don't
    items_only = Components(var_seed=0.0, var_item=0.25, var_int=0.0, k=3, n=400)
    assert seeds_needed(0.1, items_only, 400) == 2  # se 0.025: effect 4 se
    assert seeds_needed(0.01, items_only, 400) == math.inf  # se 0.025 at any k
    assert items_needed(0.01, items_only, 5) == pytest.approx(0.25 * (2.80 / 0.01) ** 2, rel=0.02)  # ~19,600
    assert seeds_needed(0.0, seeds_only, 400) == math.inf
