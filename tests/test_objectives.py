"""The policy objectives' registry and how each picks a query's example from its scored samples."""

import pytest

from apo_ray.core.objectives import POLICY_OBJECTIVES, DirectPreference, RejectionSampling, policy_objective


def test_registry_holds_rjs_and_dpo_and_names_them_in_its_error():
    assert POLICY_OBJECTIVES == {"rjs": RejectionSampling, "dpo": DirectPreference}
    with pytest.raises(ValueError, match=r"\['dpo', 'rjs'\], got 'ppo'"):
        policy_objective("ppo")
    assert policy_objective("dpo", dpo_beta=0.25).beta == 0.25
    assert isinstance(policy_objective("rjs", dpo_beta=0.25), RejectionSampling)  # not its option: ignored


def test_rjs_picks_the_best_non_empty_sample():
    rjs = policy_objective("rjs")
    assert rjs.select(["a", "b", "c"], [0.1, 0.9, 0.5]) == ("b",)
    assert rjs.select(["", "b", "  \n", "d"], [5.0, 0.2, 9.0, 0.1]) == ("b",)  # empties never win
    assert rjs.select(["", " "], [1.0, 2.0]) is None  # nothing to learn from: skip the query


def test_dpo_pairs_best_and_worst_non_empty_and_skips_ties():
    dpo = policy_objective("dpo")
    assert dpo.select(["a", "", "c", "d"], [0.5, -9.0, 0.9, -0.1]) == ("c", "d")
    assert dpo.select(["same", "same"], [1.0, 0.0]) is None  # no preference between equal texts
    assert dpo.select(["", "only"], [3.0, 1.0]) is None
    assert (dpo.responses_per_example, dpo.uses_reference, dpo.count_unit) == (2, True, "pairs")
    assert (RejectionSampling.responses_per_example, RejectionSampling.uses_reference) == (1, False)
