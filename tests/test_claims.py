"""apo_ray.outputs.claims on run folders whose scores are written by hand: verdicts of known sign and size.

Each fake run has the layout jobs/apo.py writes (summary.json, resolved_config.json, phases/ written
through PhaseStore.put), 2 rounds of the four arms, 40 test pairs and 20 test prompts.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest

from apo_ray.game.store import PhaseStore
from apo_ray.outputs.claims import claims_for, judge_claims, load_run, run_comparisons, write_claims_report

N_PAIRS, N_PROMPTS, ROUNDS = 40, 20, 2
ARMS = ("fixed", "apo", "apo_seq", "ablation")


def _rm_id(arm: str, r: int) -> str:
    if arm == "fixed" or r == 0:
        return "rm/base"
    return f"rm/{'apo' if arm == 'apo_seq' and r == 1 else arm}/r{r}"


def _policy_id(arm: str, r: int) -> str:
    return "policy/init" if r == 0 else f"policy/{'apo' if arm == 'apo_seq' and r == 1 else arm}/r{r}"


def make_run(root: Path, seed: int, *, rm_right: dict[str, int], policy_offset: dict[str, float],
             data_seed: int = 0) -> Path:
    """A finished run: RM ``rm_id`` ranks the first ``rm_right[rm_id]`` test pairs right (margin
    +1) and the rest wrong (margin -1); policy ``p`` scores ``base + policy_offset[p]`` on every
    test prompt, the base scores varying by prompt and seed."""
    store = PhaseStore(root / "phases", system=None)
    for rm_id, right in rm_right.items():
        store.put(f"scores/{rm_id}/test/chosen", [1.0] * right + [-1.0] * (N_PAIRS - right))
        store.put(f"scores/{rm_id}/test/rejected", [0.0] * N_PAIRS)
    base = np.random.default_rng(seed).normal(size=N_PROMPTS) * 3
    for policy_id, offset in policy_offset.items():
        store.put(f"scores/rm/eval/{policy_id}/test", list(base + offset))
    records = []
    for r in range(ROUNDS + 1):
        for arm in ARMS:
            rm_id, policy_id = _rm_id(arm, r), _policy_id(arm, r)
            records.append({"round": r, "rm_mode": arm, "rm": rm_id, "policy": policy_id, "eval_rm": "rm/eval",
                            "rm_test_acc": rm_right[rm_id] / N_PAIRS,
                            "policy_mean_reward": float(np.mean(base + policy_offset[policy_id])),
                            "policy_rewards": {"rm/eval": {}}})
    (root / "summary.json").write_text(json.dumps(records))
    (root / "resolved_config.json").write_text(json.dumps({"run": {"seed": seed}, "data": {"seed": data_seed},
                                                           "eval": {"n_bins": 10}}))
    return root


RM_RIGHT = {"rm/base": 20, "rm/apo/r1": 40, "rm/ablation/r1": 30, "rm/apo/r2": 40, "rm/apo_seq/r2": 20,
            "rm/ablation/r2": 30}
# APO's policy 1 below RJS's on every prompt in round 1, 0.5 above in round 2; APO-seq = APO in round 2
POLICY = {"policy/init": 0.0, "policy/fixed/r1": 0.0, "policy/apo/r1": -1.0, "policy/ablation/r1": 0.0,
          "policy/fixed/r2": 0.0, "policy/apo/r2": 0.5, "policy/apo_seq/r2": 0.5, "policy/ablation/r2": 0.0}


@pytest.fixture
def runs(tmp_path) -> list[Path]:
    return [make_run(tmp_path / f"seed{s}", s, rm_right=RM_RIGHT, policy_offset=POLICY) for s in (0, 1, 2)]


def by_key(rows):
    return {r["key"]: r for r in rows}


def test_claims_of_known_sign_and_size(runs):
    rows = by_key(judge_claims([load_run(d) for d in runs]))
    assert set(rows) == {c.key for c in claims_for(ROUNDS)}
    # RM_APO-v1 right on 40/40, RM_Base on 20/40: +0.5 on every seed, per-pair differences 1 or 0
    acc = rows["rm_acc_vs_base"]
    assert acc["mean"] == pytest.approx(0.5) and acc["sd_seeds"] == pytest.approx(0.0)
    assert [p["estimate"] for p in acc["per_seed"]] == pytest.approx([0.5] * 3)
    assert 0.3 < acc["low"] < 0.5 < acc["high"] < 0.7 and acc["verdict"] == "held"
    # The seeds agree exactly and share their items: no seed or seed x item variance is left, the item
    # term has N - 1 = 39 df, and the interval is t_39 times one seed's bootstrap standard error.
    from scipy import stats

    se = acc["per_seed"][0]["se"]
    assert acc["components"]["var_seed"] == pytest.approx(0, abs=1e-12)
    assert acc["se_total"] == pytest.approx(se) and acc["df"] == pytest.approx(39)
    assert acc["low"] == pytest.approx(0.5 - stats.t.ppf(0.975, 39) * se)
    # Holm over the measured claims: every adjusted p at least its raw p, the smallest times m
    measured = [r for r in rows.values() if "p" in r]
    assert all(r["p_holm"] >= r["p"] for r in measured)
    smallest = min(measured, key=lambda r: r["p"])
    assert smallest["p_holm"] == pytest.approx(min(1.0, smallest["p"] * len(measured)))
    # power at the paper's effect (accuracy: +1.13 points) from these components
    assert 0 <= acc["power_paper_effect"] <= 1 and acc["seeds_needed_paper_effect"] >= 2
    assert rows["rm_acc_vs_ab"]["mean"] == pytest.approx(0.25) and rows["rm_acc_vs_ab"]["verdict"] == "held"
    # policies: -1 on every prompt in round 1 (the opposite of the claim), +0.5 in round 2
    r1, r2 = rows["policy_r1"], rows["policy_r2"]
    assert (r1["mean"], r1["low"], r1["high"], r1["verdict"]) == pytest.approx((-1.0, -1.0, -1.0, "not held"))
    assert r2["mean"] == pytest.approx(0.5) and r2["verdict"] == "held"
    # APO-seq's policy equal to APO's in round 2: exactly 0, undecided, nothing would decide it
    seq = rows["seq_policy_last"]
    assert (seq["mean"], seq["verdict"], seq["p"]) == (0.0, "undecided", 1.0)
    assert seq["power_paper_effect"] is None  # the paper's policy scores are not in our units
    # the two policy claims issue 21 added: RJS over rounds (0 here) and APO-v1 vs the ablation's (-1)
    assert (rows["rjs_improves"]["mean"], rows["rjs_improves"]["verdict"]) == (0.0, "undecided")
    assert (rows["policy_vs_ab_r1"]["mean"], rows["policy_vs_ab_r1"]["verdict"]) == (-1.0, "not held")
    # ECE by hand. RM_APO-v1, margin +1 on every pair: p = sigmoid(1) = 0.731 with label 1 (bin 7)
    # and 0.269 with label 0 (bin 2): ECE = (40 * (1 - p) + 40 * (1 - p)) / 80 = 1 - p = 0.269.
    # RM_Base, margin +1 on 20 pairs and -1 on 20: bin 7 holds 40 predictions p (20 labelled 1),
    # bin 2 holds 40 of 1 - p (20 labelled 1): ECE = (|40p - 20| + |40(1 - p) - 20|) / 80 = 0.231.
    p = 1 / (1 + math.exp(-1))
    ece_apo = 1 - p
    ece_base = (abs(40 * p - 20) + abs(40 * (1 - p) - 20)) / 80
    assert rows["rm_ece_vs_base"]["mean"] == pytest.approx(ece_apo - ece_base)


def test_within_run_comparisons_match_the_summary(runs):
    comp = run_comparisons(runs[0])
    rm = {(r["round"], r["rm"], r["vs_rm"]): r for r in comp["rm"]}
    # each RM of rounds 1-2 against RM_Base and RM_Base-AB; APO-seq's round-2 RM also against round 1's
    assert set(rm) == {(1, "rm/apo/r1", "rm/base"), (1, "rm/apo/r1", "rm/ablation/r1"), (1, "rm/ablation/r1", "rm/base"),
                       (2, "rm/apo/r2", "rm/base"), (2, "rm/apo/r2", "rm/ablation/r2"),
                       (2, "rm/apo_seq/r2", "rm/base"), (2, "rm/apo_seq/r2", "rm/ablation/r2"),
                       (2, "rm/apo_seq/r2", "rm/apo/r1"), (2, "rm/ablation/r2", "rm/base")}
    assert rm[(1, "rm/apo/r1", "rm/base")]["arms"] == ["apo", "apo_seq"]
    for (r, a, b), row in rm.items():
        assert row["acc"]["estimate"] == pytest.approx((RM_RIGHT[a] - RM_RIGHT[b]) / N_PAIRS)
        assert row["acc"]["low"] <= row["acc"]["estimate"] <= row["acc"]["high"]
    policy = {(r["round"], r["policy"]): r for r in comp["policy"]}
    assert set(policy) == {(r, f"policy/{arm}/r{r}") for r in (1, 2) for arm in ("apo", "ablation")} | {
        (2, "policy/apo_seq/r2")}  # apo_seq's round 1 is apo's: one row, both arms
    assert policy[(1, "policy/apo/r1")]["arms"] == ["apo", "apo_seq"]
    assert policy[(2, "policy/ablation/r2")]["diff"]["estimate"] == pytest.approx(0.0)
    assert policy[(1, "policy/apo/r1")]["diff"]["estimate"] == pytest.approx(-1.0)
    assert policy[(1, "policy/apo/r1")]["vs_policy"] == "policy/fixed/r1"


def test_judge_win_rate_interval():
    from apo_ray.outputs.claims import judge_intervals

    (row,) = judge_intervals({"apo": {"n": 20, "win": 7, "loss": 3, "tie": 2, "invalid": 8}})
    assert row["win_rate"]["rate"] == pytest.approx(0.35)
    assert row["win_rate"]["low"] == pytest.approx(0.1812, abs=1e-4)
    assert row["win_of_decided"]["rate"] == pytest.approx(0.7) and row["win_of_decided"]["n"] == 10


def test_runs_with_other_splits_are_not_pooled(tmp_path):
    a = make_run(tmp_path / "a", 0, rm_right=RM_RIGHT, policy_offset=POLICY)
    b = make_run(tmp_path / "b", 1, rm_right=RM_RIGHT, policy_offset=POLICY, data_seed=1)
    with pytest.raises(ValueError, match="data settings"):
        judge_claims([load_run(a), load_run(b)])
    with pytest.raises(FileNotFoundError, match="phases"):
        load_run(tmp_path / "nothing")


def test_claims_report_files(runs, tmp_path):
    out = tmp_path / "report"
    machine = {"per_seed": [{"seed": s, "wall_seconds": 60.0 * (s + 1), "cpu_seconds": 100.0, "dir": str(d),
                             "phase_seconds": {"train_rm": 10.0 + s}} for s, d in enumerate(runs)]}
    report = write_claims_report(runs, out, notes=["a note"], machine=machine, n_resamples=200).read_text()
    assert "| APO RM (RM_APO-v1) more accurate than RM_Base |" in report
    assert "**held**" in report and "**not held**" in report and "**undecided**" in report
    assert "- a note" in report and "train_rm" in report
    data = json.loads((out / "claims.json").read_text())
    assert data["seeds"] == [0, 1, 2] and len(data["claims"]) == len(claims_for(ROUNDS))
    for name in ("claims.png", "by_round.png"):
        assert (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # every item's score per model and seed: a claim's per-seed estimate recomputes from the CSV
    import csv

    with (out / "item_scores.csv").open() as f:
        items = list(csv.DictReader(f))
    assert {r["seed"] for r in items} == {"0", "1", "2"}
    apo = [r for r in items if r["seed"] == "1" and r["model"] == "rm/apo/r1" and r["kind"] == "rm_test_pair"]
    assert len(apo) == N_PAIRS and sum(float(r["score_a"]) > float(r["score_b"]) for r in apo) == RM_RIGHT["rm/apo/r1"]
    answers = [r for r in items if r["seed"] == "2" and r["model"] == "policy/apo/r2"]
    assert len(answers) == N_PROMPTS and answers[0]["scorer"] == "rm/eval"


@pytest.mark.parametrize("shared", [True, False])
def test_claims_report_names_the_evaluation_rm_once_when_shared_else_per_seed(tmp_path, shared):
    dirs = []
    for s in (0, 1):
        d = make_run(tmp_path / f"seed{s}", s, rm_right=RM_RIGHT, policy_offset=POLICY)
        records = json.loads((d / "summary.json").read_text())
        acc = 0.6 if shared else 0.6 + 0.01 * s  # a per-seed RM scores the policies differently in each seed
        for rec in records:
            rec["eval_rm_quality"] = {"rm/eval": {"acc": acc, "n": 100, "ece": 0.05}}
        (d / "summary.json").write_text(json.dumps(records))
        dirs.append(d)
    report = write_claims_report(dirs, tmp_path / "out", n_resamples=50).read_text()
    lines = [line for line in report.splitlines() if "Scored by `rm/eval`" in line]
    if shared:
        expected = ("- Scored by `rm/eval`: test accuracy 60.0% [50.2, 69.1] (Wilson 95%), ECE 0.0500, "
                    "on 100 test pairs.")
        assert lines == [expected]
    else:
        assert [line.split(":")[0] for line in lines] == ["- seed 0", "- seed 1"]
        assert "61.0%" in lines[1]


def test_rm_accuracy_by_data_source(tmp_path):
    """Test pairs from two sources: RM_APO-v1 ranks all 40 right, RM_Base the first 20, which are
    pairs 0-19; with pairs 0-9 and 20-29 from source "a", RM_Base is right on 10 of a's 20 (50%)
    and 10 of b's 20 (50%); with 0-19 from "a", on all of a's (100%) and none of b's (0%)."""
    dirs = []
    for s, split in ((0, "interleaved"), (1, "blocked")):
        d = make_run(tmp_path / f"seed{s}", s, rm_right=RM_RIGHT, policy_offset=POLICY)
        if split == "interleaved":
            sources = ["a"] * 10 + ["b"] * 10 + ["a"] * 10 + ["b"] * 10
        else:
            sources = ["a"] * 20 + ["b"] * 20
        PhaseStore(d / "phases", system=None).put("data/test_sources", sources)
        dirs.append(d)
    report = write_claims_report(dirs, tmp_path / "out", n_resamples=50).read_text()
    data = json.loads((tmp_path / "out" / "claims.json").read_text())
    rows = {(r["rm"], r["source"]): r for r in data["rm_accuracy_by_source"]}
    assert rows[("rm/base", "a")]["acc"] == {"0": 0.5, "1": 1.0} and rows[("rm/base", "b")]["acc"] == {"0": 0.5, "1": 0.0}
    assert rows[("rm/apo/r1", "b")]["acc"] == {"0": 1.0, "1": 1.0} and rows[("rm/apo/r1", "a")]["n"] == 20
    assert "## RM test accuracy by data source" in report
    # RM_Base on source a: 50 and 100 -> mean 75.0, sd 35.4
    assert any(line.startswith("| RM_Base |") and "| a |" in line and "75.0 ± 35.4" in line for line in report.splitlines())
    import csv

    with (tmp_path / "out" / "item_scores.csv").open() as f:
        items = [r for r in csv.DictReader(f) if r["seed"] == "1" and r["model"] == "rm/base"]
    assert [r["source"] for r in items] == sources


def test_no_by_source_section_without_sources(runs, tmp_path):
    report = write_claims_report(runs, tmp_path / "out", n_resamples=50).read_text()
    assert "by data source" not in report
    assert json.loads((tmp_path / "out" / "claims.json").read_text())["rm_accuracy_by_source"] == []


def test_sources_that_do_not_match_the_scores_name_the_run(tmp_path):
    d = make_run(tmp_path / "seed0", 0, rm_right=RM_RIGHT, policy_offset=POLICY)
    PhaseStore(d / "phases", system=None).put("data/test_sources", ["a", "b"] * 3)  # 6 labels, 40 pairs
    with pytest.raises(ValueError, match=r"seed0: 6 test-pair sources \(data/test_sources\) for 40 test pairs"):
        write_claims_report([d], tmp_path / "out", n_resamples=20)


def test_load_run_names_a_damaged_summary(tmp_path):
    (tmp_path / "phases").mkdir()
    (tmp_path / "summary.json").write_text('[{"round": 0,')  # cut short
    with pytest.raises(ValueError, match=r"summary.json: not valid JSON \(line 1"):
        load_run(tmp_path)
