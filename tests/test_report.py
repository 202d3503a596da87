"""apo_ray.outputs.report: tables, CSV/JSON and figures from fake summary.json records."""

from __future__ import annotations

import csv
import json
import math

import pytest

from apo_ray.outputs.report import format_markdown_table, rm_display_name, write_report

ARMS = ("fixed", "apo", "apo_seq", "ablation")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _bins(shift: float, empty: tuple[int, ...] = (0, 9)) -> list[dict]:
    out = []
    for k in range(10):
        lo, hi = k / 10, (k + 1) / 10
        if k in empty:
            out.append({"lo": lo, "hi": hi, "count": 0, "mean_predicted": None, "observed": None})
        else:
            mid = (lo + hi) / 2
            out.append({"lo": lo, "hi": hi, "count": 40 + 10 * (5 - abs(k - 4.5)), "mean_predicted": mid,
                        "observed": min(1.0, max(0.0, mid + shift * (mid - 0.5)))})
    return out


def _rm_id(arm: str, r: int) -> str:
    if arm == "fixed" or r == 0:
        return "rm/base"
    return f"rm/{'apo' if arm == 'apo_seq' and r == 1 else arm}/r{r}"


# Made-up but paper-shaped numbers per RM id: (dev acc, dev ece, test acc, test ece, ace, mce).
RM_METRICS = {
    "rm/base": (0.6210, 0.021, 0.6304, 0.0190, 0.030, 0.061),
    "rm/apo/r1": (0.6350, 0.060, 0.6417, 0.0640, 0.081, 0.140),
    "rm/apo/r2": (0.6380, 0.058, 0.6432, 0.0610, 0.079, 0.131),
    "rm/apo_seq/r2": (0.6390, 0.081, 0.6423, 0.1040, 0.120, 0.210),
    "rm/ablation/r1": (0.6300, 0.044, 0.6353, 0.0460, 0.055, 0.090),
    "rm/ablation/r2": (0.6320, 0.047, 0.6360, 0.0470, 0.057, 0.095),
}
REWARD = {("fixed", 1): 1.546, ("apo", 1): 1.610, ("apo_seq", 1): 1.610, ("ablation", 1): 1.570,
          ("fixed", 2): 1.896, ("apo", 2): 1.975, ("apo_seq", 2): 2.008, ("ablation", 2): 1.900}


def fake_records(with_dev: bool = True) -> list[dict]:
    records = []
    for r in range(3):
        for arm in ARMS:
            rm = _rm_id(arm, r)
            dacc, dece, tacc, tece, ace, mce = RM_METRICS[rm]
            lineage = "apo" if arm == "apo_seq" and r == 1 else arm
            rec = {"round": r, "rm_mode": arm, "rm": rm,
                   "policy": "policy/init" if r == 0 else f"policy/{lineage}/r{r}",
                   "eval_rm": "rm/eval", "gold_source": "gpt4",
                   "rm_test_acc": tacc, "rm_test_ece": tece, "rm_test_ace": ace, "rm_test_mce": mce,
                   "rm_test_bins": _bins(tece * 5),
                   "policy_mean_reward": 1.246 if r == 0 else REWARD[(arm, r)],
                   "policy_reward_stderr": 0.012 + 0.001 * r,
                   "test_queries": 200,
                   "phase_seconds": ({"train_rm_base": 30.0, "train_eval_rm": 20.0, "evaluate": 5.0,
                                      "evaluate_total": 5.5} if r == 0 else
                                     {"sample_gold": 10.0, "train_rm": 0.0 if arm == "fixed" else 8.0,
                                      "sample_queries": 12.0, "score_samples": 3.0, "train_policy": 9.0,
                                      "evaluate": 4.0, "evaluate_total": 4.2})}
            if with_dev:
                rec.update(rm_dev_acc=dacc, rm_dev_ece=dece, rm_dev_ace=ace, rm_dev_mce=mce,
                           rm_dev_bins=_bins(dece * 5, empty=(0, 1, 8, 9)))
            if r >= 1:
                rec.update(apo_pairs=0 if arm in ("fixed", "ablation") else 400, best_of_s_mean_score=2.1,
                           rm_train={} if arm == "fixed" else {"loss_first": 0.69, "loss_last": 0.6, "steps": 20},
                           policy_train={"loss_first": 2.0, "loss_last": 1.7, "steps": 30})
            records.append(rec)
    return records


JUDGE = {
    "apo": {"n": 100, "win": 41, "tie": 30, "loss": 22, "inconsistent": 5, "invalid": 2, "win_rate": 0.41,
            "tie_rate": 0.30, "loss_rate": 0.22, "inconsistent_rate": 0.05, "invalid_rate": 0.02},
    "apo_seq": {"n": 100, "win": 35, "tie": 33, "loss": 30, "inconsistent": 2, "invalid": 0, "win_rate": 0.35,
                "tie_rate": 0.33, "loss_rate": 0.30, "inconsistent_rate": 0.02, "invalid_rate": 0.0,
                "verdicts": {"A": 1}, "request_errors": 0},
}


def _section(md: str, heading: str) -> list[str]:
    """Table rows (header and separator excluded) of the first table after ``heading``."""
    lines = md.split(heading, 1)[1].splitlines()
    table = []
    for line in lines:
        if line.startswith("|"):
            table.append(line)
        elif table:
            break
    return table[2:]


def _assert_png(path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_MAGIC, path
    assert len(data) > 5000, (path, len(data))


def test_rm_display_name():
    assert rm_display_name({"rm": "rm/base", "rm_mode": "apo", "round": 0}) == "RM_Base"
    assert rm_display_name({"rm": "rm/base", "rm_mode": "fixed", "round": 2}) == "RM_Base"
    assert rm_display_name({"rm": "rm/apo/r1", "rm_mode": "apo_seq", "round": 1}) == "RM_APO-v1"
    assert rm_display_name({"rm": "rm/apo_seq/r2", "rm_mode": "apo_seq", "round": 2}) == "RM_APO-v2seq"
    assert rm_display_name({"rm": "rm/ablation/r1", "rm_mode": "ablation", "round": 1}) == "RM_Base-AB(v1)"
    # no id: from arm + round
    assert rm_display_name({"rm_mode": "apo", "round": 3}) == "RM_APO-v3"
    assert rm_display_name({"rm_mode": "fixed", "round": 3}) == "RM_Base"


def test_format_markdown_table():
    md = format_markdown_table(["a", "b"], [[1, None], ["x|y"]])
    assert md.splitlines() == ["| a | b |", "| --- | --- |", "| 1 |  |", "| x\\|y |  |"]


def test_write_report_with_judge(tmp_path):
    records = fake_records()
    path = write_report(tmp_path, records, judge=JUDGE, notes=["pairs: 1000 train", "wall time: 12 min"],
                        title="Test run")
    assert path == tmp_path / "report.md"
    md = path.read_text()
    assert md.startswith("# Test run")
    assert "- pairs: 1000 train" in md and "gold answers: gpt4" in md

    # Table 2: RM_Base once, fixed never adds a row; apo_seq r1 shares RM_APO-v1.
    rm_rows = _section(md, "## Table 2")
    names = [row.split("|")[1].strip() for row in rm_rows]
    assert names == ["RM_Base", "RM_APO-v1", "RM_Base-AB(v1)", "RM_APO-v2", "RM_APO-v2seq", "RM_Base-AB(v2)"]
    base = rm_rows[0]
    assert "63.04" in base and "62.10" in base and "0.0190" in base and "fixed, apo, apo_seq, ablation" in base
    assert "apo, apo_seq" in rm_rows[1]

    # Table 3: one row per arm, columns round 0..2 with stderr.
    pol_rows = _section(md, "## Table 3")
    assert [row.split("|")[1].strip() for row in pol_rows] == [
        "RJS (RM_Base fixed)", "APO (vR)", "APO (vR-seq)", "RM_Base-AB"]
    assert "| 1.246 ± 0.012 | 1.546 ± 0.013 | 1.896 ± 0.014 |" in pol_rows[0]
    assert "Round 0 (start)" in md and "Round 2" in md

    # Judge table and wall time.
    judge_rows = _section(md, "## LLM-as-judge")
    assert len(judge_rows) == 2 and "0.410" in judge_rows[0] and "| 41 | 30 | 22 | 5 | 2 |" in judge_rows[0]
    wall_rows = _section(md, "## Wall time")
    assert len(wall_rows) == 3
    # round 0: set-up phases once (30 + 20), evaluate summed over 4 arms (20); *_total excluded.
    assert wall_rows[0].split("|")[-2].strip() == "70.0"

    for name in ("reliability.png", "fig2_acc_vs_ece.png", "fig2_reward_by_round.png", "fig3_judge.png"):
        _assert_png(tmp_path / name)
        assert f"]({name})" in md

    with (tmp_path / "rm_table.csv").open() as f:
        rm_csv = list(csv.DictReader(f))
    assert [r["rm"] for r in rm_csv] == ["rm/base", "rm/apo/r1", "rm/ablation/r1", "rm/apo/r2", "rm/apo_seq/r2",
                                         "rm/ablation/r2"]
    for row in rm_csv:
        dacc, dece, tacc, tece, ace, mce = RM_METRICS[row["rm"]]
        assert float(row["test_acc"]) == tacc and float(row["test_ece"]) == tece
        assert float(row["dev_acc"]) == dacc and float(row["dev_ece"]) == dece
        assert float(row["test_ace"]) == ace and float(row["test_mce"]) == mce

    with (tmp_path / "policy_table.csv").open() as f:
        pol_csv = list(csv.DictReader(f))
    assert len(pol_csv) == 12
    for row in pol_csv:
        r = int(row["round"])
        assert float(row["mean_reward"]) == (1.246 if r == 0 else REWARD[(row["arm"], r)])
        assert float(row["reward_stderr"]) == pytest.approx(0.012 + 0.001 * r)

    data = json.loads((tmp_path / "report.json").read_text())
    assert len(data["rm_table"]) == 6 and len(data["policy_table"]) == 12 and len(data["judge"]) == 2
    assert "fig3_judge.png" in data["figures"]


def test_write_report_without_judge_or_dev(tmp_path):
    records = fake_records(with_dev=False)
    records[5]["policy_reward_stderr"] = float("nan")  # a single test query
    del records[6]["rm_test_bins"]
    path = write_report(tmp_path, records)
    md = path.read_text()
    assert "## LLM-as-judge" not in md and "fig3_judge.png" not in md
    assert not (tmp_path / "fig3_judge.png").exists()
    rm_rows = _section(md, "## Table 2")
    assert len(rm_rows) == 6 and "| – | – | 63.04 [57.4, 68.6] | 280 |" in rm_rows[0]
    for name in ("reliability.png", "fig2_acc_vs_ece.png", "fig2_reward_by_round.png"):
        _assert_png(tmp_path / name)
    with (tmp_path / "rm_table.csv").open() as f:
        assert all(row["dev_acc"] == "" for row in csv.DictReader(f))
    data = json.loads((tmp_path / "report.json").read_text())  # strict JSON: NaN became null
    assert any(p["reward_stderr"] is None for p in data["policy_table"])


def test_write_report_sparse_records(tmp_path):
    """Bare records (no RM metrics, no timings) still give a report."""
    records = [{"round": 0, "rm_mode": "fixed", "rm": "rm/base", "policy_mean_reward": 1.0},
               {"round": 1, "rm_mode": "fixed", "rm": "rm/base", "policy_mean_reward": math.nan}]
    md = write_report(tmp_path, records).read_text()
    assert "RM_Base" in md and (tmp_path / "fig2_reward_by_round.png").exists()
    assert not (tmp_path / "reliability.png").exists()


def test_report_prints_the_evaluation_rms_quality_and_the_d_apo_accuracy(tmp_path):
    records = fake_records()
    for rec in records:
        rec["eval_rm_quality"] = {"rm/eval": {"acc": 0.625, "ece": 0.0312, "n": 400}}
        if rec["rm_mode"] == "apo" and rec["round"] >= 1:
            rec["rm_apo_acc_before"], rec["rm_apo_acc_after"] = 0.40, 0.875
    md = write_report(tmp_path, records).read_text()
    # 250 of 400: Wilson 95% interval [57.7, 67.1]
    assert "- Scored by `rm/eval`: test accuracy 62.5% [57.7, 67.1] (Wilson 95%), ECE 0.0312, on 400 test pairs." in md
    rows = [line for line in md.splitlines() if line.startswith("| APO (vR) |") and "87.5" in line]
    assert rows == ["| APO (vR) | 1 | 40.0 | 87.5 | 400 |", "| APO (vR) | 2 | 40.0 | 87.5 | 400 |"]


def _bins_of(n_pairs: int) -> list[dict]:
    """Calibration bins holding n_pairs test pairs (each pair twice: p and 1 - p)."""
    return [{"lo": 0.4, "hi": 0.5, "count": n_pairs, "mean_predicted": 0.45, "observed": 0.4},
            {"lo": 0.5, "hi": 0.6, "count": n_pairs, "mean_predicted": 0.55, "observed": 0.6}]


@pytest.mark.parametrize(("k", "n", "low", "high", "verdict"), [
    # Wilson 95% by hand: centre (p + z^2/2n) / (1 + z^2/n), half-width z sqrt(p(1-p)/n + z^2/4n^2) / (1 + z^2/n)
    (160, 256, 0.5643, 0.6820, "above chance"),
    (5, 16, 0.1416, 0.5560, "cannot tell the RM from chance"),
    (60, 200, 0.2407, 0.3668, "below chance"),
])
def test_table2_gives_test_accuracy_with_its_wilson_interval_and_what_it_shows(k, n, low, high, verdict):
    from apo_ray.outputs.report import _acc_with_interval, rm_table, what_rm_base_shows

    rec = {"round": 0, "rm_mode": "fixed", "rm": "rm/base", "rm_test_acc": k / n, "rm_test_bins": _bins_of(n)}
    rows = rm_table([rec])
    assert rows[0]["test_pairs"] == n
    assert _acc_with_interval(rows[0]) == f"{100 * k / n:.2f} [{100 * low:.1f}, {100 * high:.1f}]"
    sentence = what_rm_base_shows(rows)
    assert verdict in sentence and f"of {n} test pairs" in sentence


def test_table2_without_test_pairs_says_it_cannot_tell():
    from apo_ray.outputs.report import rm_table, what_rm_base_shows

    rows = rm_table([{"round": 0, "rm_mode": "fixed", "rm": "rm/base", "rm_test_acc": None}])
    assert rows[0]["test_pairs"] is None
    assert "cannot say whether it learned" in what_rm_base_shows(rows)
