"""Run report: the paper's tables and figures from a run's ``summary.json`` records.

Plain functions, no Ray / torch. Input is the list of per-(round, arm) records written by
:func:`apo_ray.outputs.summary.write_summary` (see :meth:`apo_ray.game.loop.APOGame.evaluate` / ``play_round``).
:func:`write_report` writes into the output directory:

* ``report.md``: Table 2 style (reward models: accuracy / calibration, one row per distinct RM),
  Table 3 style (policies: mean evaluation-RM score per arm and round, +- stderr), wall time per
  phase and round, the judge table when judge summaries are given, and the figures embedded.
* ``reliability.png`` (one subplot per distinct RM, test split, dev as fallback),
  ``fig2_acc_vs_ece.png``, ``fig2_reward_by_round.png``, ``fig3_judge.png`` (judge only).
* ``rm_table.csv``, ``policy_table.csv`` and ``report.json``: the tables as data (raw fractions,
  not percentages; missing values are empty cells / ``null``).
* when the run's phase store is beside it (``phases/``): paired differences with bootstrap
  intervals (:mod:`apo_ray.outputs.claims`: each RM vs RM_Base / RM_Base-AB, each policy vs RJS, the judge's
  win rate), ``paired_differences.png``, and ``paired_differences`` in ``report.json``.

Missing keys (no dev pairs, no test pairs, NaN stderr from a single test query) are shown as
``–`` and never raise.
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from apo_ray.core.arms import scored_by_rm_base_warning
from apo_ray.core.metrics import proportion_interval
from apo_ray.outputs.claims import comparisons_md, eval_rm_quality_md, plot_comparisons, run_comparisons
from apo_ray.outputs.tables import (
    ARM_COLORS,
    ARM_LABELS,
    ARM_ORDER,
    MISSING,
    arm_label,
    format_markdown_table,
    jsonable,
    pyplot,
    rm_display_name,
)

__all__ = [
    "ARM_LABELS",
    "format_markdown_table",
    "policy_table",
    "rm_display_name",
    "rm_table",
    "scored_by_rm_base_warning",
    "wall_time_table",
    "write_report",
]

# Set up once before round 1 and copied into every arm's round-0 record: counted once, not per arm.
SHARED_SETUP_PHASES = ("train_rm_base", "train_eval_rm")
DPI = 120

# -- small helpers -------------------------------------------------------------------------------
def _num(x: Any) -> float | None:
    """A finite float, or None (missing, None, NaN, inf, not a number)."""
    if isinstance(x, bool) or x is None:
        return None
    try:
        v = float(x)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) else None


def _fmt(x: Any, digits: int, scale: float = 1.0) -> str:
    v = _num(x)
    return MISSING if v is None else f"{v * scale:.{digits}f}"


def _arm_key(arm: str) -> tuple[int, str]:
    return (ARM_ORDER.index(arm) if arm in ARM_ORDER else len(ARM_ORDER), arm)


def _sorted_records(records: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    return sorted(records, key=lambda r: (int(r.get("round", 0)), _arm_key(str(r.get("rm_mode", "")))))


def _arms(records: Sequence[Mapping[str, Any]]) -> list[str]:
    return sorted({str(r.get("rm_mode", "?")) for r in records}, key=_arm_key)


# -- tables as data ------------------------------------------------------------------------------
_RM_METRICS = ("dev_acc", "dev_ece", "dev_ace", "dev_mce", "test_acc", "test_ece", "test_ace", "test_mce")


def rm_table(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """One row per distinct RM (by ``rm`` id, first record seen in (round, arm) order).

    Row keys: ``rm`` (id), ``name``, ``arm`` (the first arm using it), ``arms`` (all of them),
    ``round``, the eight ``dev_*`` / ``test_*`` metrics (raw fractions, None when missing),
    ``test_pairs`` (how many test pairs were scored; None without test bins) and ``bins`` (test
    bins, dev as fallback; for the reliability diagrams).
    """
    rows: dict[str, dict[str, Any]] = {}
    for rec in _sorted_records(records):
        key = str(rec.get("rm") or rm_display_name(rec))
        arm = str(rec.get("rm_mode", "?"))
        if key in rows:
            if arm not in rows[key]["arms"]:
                rows[key]["arms"].append(arm)
            continue
        row: dict[str, Any] = {"rm": key, "name": rm_display_name(rec), "arm": arm, "arms": [arm],
                               "round": int(rec.get("round", 0) or 0)}
        for m in _RM_METRICS:
            row[m] = _num(rec.get(f"rm_{m}"))
        bins, split = rec.get("rm_test_bins"), "test"
        if not bins:
            bins, split = rec.get("rm_dev_bins"), "dev"
        row["bins"], row["bins_split"] = (list(bins), split) if bins else (None, None)
        # Test pairs scored: the calibration bins hold each pair twice (p and 1 - p: both orientations).
        test_bins = rec.get("rm_test_bins") or []
        row["test_pairs"] = sum(int(b.get("count") or 0) for b in test_bins) // 2 or None
        rows[key] = row
    return list(rows.values())


def _acc_interval(row: Mapping[str, Any]) -> dict[str, float] | None:
    """The row's test accuracy as k of n pairs with its Wilson interval; None without both."""
    acc, n = row.get("test_acc"), row.get("test_pairs")
    if acc is None or not n or not math.isfinite(acc):
        return None
    return proportion_interval(round(acc * n), n)


def _acc_with_interval(row: Mapping[str, Any]) -> str:
    ci = _acc_interval(row)
    if ci is None:
        return _fmt(row.get("test_acc"), 2, 100)
    return f"{_fmt(row['test_acc'], 2, 100)} [{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]"


def what_rm_base_shows(rms: Sequence[Mapping[str, Any]]) -> str:
    """One sentence a reader can act on: whether the first RM of the run (RM_Base) is told apart
    from chance (50%) on the test pairs, by its Wilson interval."""
    ci = _acc_interval(rms[0])
    if ci is None:
        return f"{rms[0]['name']} was not scored on test pairs, so this run cannot say whether it learned."
    head = (f"{rms[0]['name']} ranks the chosen answer first on {100 * rms[0]['test_acc']:.1f}% of {ci['n']} test pairs "
            f"[{100 * ci['low']:.1f}, {100 * ci['high']:.1f}]: ")
    if ci["low"] > 0.5:
        return head + "above chance, so the RM learned something from its preference pairs."
    if ci["high"] < 0.5:
        return head + "below chance: it learned the opposite of the preferences (check the data's chosen/rejected)."
    return head + "the interval contains 50%, so this run cannot tell the RM from chance (more pairs or steps)."


def policy_table(records: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Long form: one row per (arm, round) with the policy's mean evaluation-RM score and stderr."""
    out = []
    for rec in _sorted_records(records):
        arm = str(rec.get("rm_mode", "?"))
        out.append({"arm": arm, "arm_label": arm_label(arm), "round": int(rec.get("round", 0) or 0),
                    "policy": rec.get("policy"), "rm": rec.get("rm"), "eval_rm": rec.get("eval_rm"),
                    "mean_reward": _num(rec.get("policy_mean_reward")),
                    "reward_stderr": _num(rec.get("policy_reward_stderr")),
                    "best_of_s_mean_score": _num(rec.get("best_of_s_mean_score")),
                    "apo_pairs": rec.get("apo_pairs"), "test_queries": rec.get("test_queries"),
                    "eval_rm_test_acc": _num(rec.get("eval_rm_test_acc")),
                    "eval_rm_test_ece": _num(rec.get("eval_rm_test_ece")),
                    "rm_apo_acc_before": _num(rec.get("rm_apo_acc_before")),
                    "rm_apo_acc_after": _num(rec.get("rm_apo_acc_after"))})
    return out


def wall_time_table(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[dict[str, Any]]]:
    """Seconds per phase and round, summed over arms: ``(phases, rows)``.

    The set-up phases (:data:`SHARED_SETUP_PHASES`), copied into every round-0 record, are counted
    once. ``total`` sums the phases except the ``*_total`` ones (``evaluate_total`` overlaps
    ``evaluate``).
    """
    per_round: dict[int, dict[str, float]] = {}
    phases: list[str] = []
    for rec in _sorted_records(records):
        r = int(rec.get("round", 0) or 0)
        acc = per_round.setdefault(r, {})
        for phase, secs in (rec.get("phase_seconds") or {}).items():
            v = _num(secs)
            if v is None:
                continue
            if phase not in phases:
                phases.append(phase)
            if phase in SHARED_SETUP_PHASES:
                acc[phase] = max(acc.get(phase, 0.0), v)
            else:
                acc[phase] = acc.get(phase, 0.0) + v
    rows = []
    for r in sorted(per_round):
        acc = per_round[r]
        rows.append({"round": r, **{p: acc.get(p) for p in phases},
                     "total": sum(v for p, v in acc.items() if not p.endswith("_total"))})
    return phases, rows


def _judge_rows(judge: Mapping[str, Mapping[str, Any]], baseline: str) -> list[dict[str, Any]]:
    rows = []
    for arm in sorted(judge, key=lambda a: _arm_key(str(a))):
        s = judge[arm]
        row: dict[str, Any] = {"arm": str(arm), "arm_label": arm_label(str(arm)), "baseline": baseline}
        for k in ("n", "win", "tie", "loss", "inconsistent", "invalid"):
            row[k] = int(s.get(k, 0) or 0)
        n = row["n"] or sum(row[k] for k in ("win", "tie", "loss", "inconsistent", "invalid"))
        for k in ("win", "tie", "loss", "inconsistent", "invalid"):
            rate = _num(s.get(f"{k}_rate"))
            row[f"{k}_rate"] = rate if rate is not None else (row[k] / n if n else None)
        rows.append(row)
    return rows


# -- files ---------------------------------------------------------------------------------------
def _write_csv(path: Path, headers: Sequence[str], rows: Iterable[Mapping[str, Any]]) -> None:
    def cell(v: Any) -> Any:
        if v is None or (isinstance(v, float) and not math.isfinite(v)):
            return ""
        if isinstance(v, (list, tuple)):
            return ";".join(map(str, v))
        return repr(v) if isinstance(v, float) else v

    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(headers)
        for row in rows:
            w.writerow([cell(row.get(h)) for h in headers])


def _save(fig, path: Path) -> bool:
    fig.tight_layout()
    fig.savefig(path, dpi=DPI)
    pyplot().close(fig)
    return True


def _plot_reliability(path: Path, rms: Sequence[Mapping[str, Any]]) -> bool:
    rms = [r for r in rms if r["bins"]]
    if not rms:
        return False
    plt = pyplot()
    ncols = min(3, len(rms))
    nrows = math.ceil(len(rms) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(4.2 * ncols, 4.0 * nrows), squeeze=False)
    for ax, rm in zip(axes.flat, rms):
        bins = rm["bins"]
        lo = [float(b["lo"]) for b in bins]
        width = [float(b["hi"]) - float(b["lo"]) for b in bins]
        obs = [_num(b.get("observed")) for b in bins]
        pred = [_num(b.get("mean_predicted")) for b in bins]
        total = sum(int(b.get("count", 0) or 0) for b in bins) or 1
        ax.bar(lo, [o or 0.0 for o in obs], width=width, align="edge", color=ARM_COLORS.get(rm["arm"], "tab:blue")
               if rm["name"] != "RM_Base" else "tab:purple", alpha=0.75, edgecolor="black", linewidth=0.6,
               label="observed fraction")
        xs = [p for p in pred if p is not None]
        ys = [o for p, o in zip(pred, obs) if p is not None]
        ax.plot(xs, ys, "o", color="black", markersize=3, label="(mean predicted, observed)")
        ax.plot([0, 1], [0, 1], "--", color="red", linewidth=1, label="perfect calibration")
        for x0, w, o, b in zip(lo, width, obs, bins):
            count = int(b.get("count", 0) or 0)
            if count:
                ax.text(x0 + w / 2, 0.015, f"{count / total:.0%}", ha="center", va="bottom", fontsize=6.5,
                        rotation=90)
        split = rm["bins_split"]
        ece, ace = rm.get(f"{split}_ece"), rm.get(f"{split}_ace")
        ax.set_title(f"{rm['name']} ({split})\nECE {_fmt(ece, 3)}  ACE {_fmt(ace, 3)}", fontsize=10)
        ax.set_xlim(0, 1)
        ax.set_ylim(0, 1.05)
        ax.set_xlabel("predicted P(y preferred)")
        ax.set_ylabel("observed fraction preferred")
        ax.grid(alpha=0.3)
    for ax in list(axes.flat)[len(rms):]:
        ax.set_visible(False)
    axes.flat[0].legend(loc="upper left", fontsize=7)
    fig.suptitle("Reliability diagrams (labels: share of predictions in bin)", fontsize=11)
    return _save(fig, path)


def _plot_acc_vs_ece(path: Path, rms: Sequence[Mapping[str, Any]]) -> bool:
    points = []
    for rm in rms:
        for split in ("dev", "test"):
            acc, ece = rm.get(f"{split}_acc"), rm.get(f"{split}_ece")
            if acc is not None and ece is not None:
                points.append((rm, split, -ece, acc * 100))
                break
    if not points:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    seen: set[str] = set()
    for rm, split, x, y in points:
        group = "base" if rm["name"] == "RM_Base" else rm["arm"]
        label = "RM_Base" if group == "base" else arm_label(group)
        ax.scatter([x], [y], s=50, color=ARM_COLORS.get(group, "tab:red"),
                   label=None if label in seen else label, zorder=3,
                   marker="o" if split == "dev" else "s")
        seen.add(label)
        ax.annotate(rm["name"] + ("" if split == "dev" else " (test)"), (x, y), textcoords="offset points",
                    xytext=(5, 4), fontsize=8)
    splits = {s for _, s, _, _ in points}
    where = "dev" if splits == {"dev"} else "test" if splits == {"test"} else "dev; squares: test"
    ax.set_xlabel(f"-ECE ({where})")
    ax.set_ylabel(f"preference accuracy % ({where})")
    ax.set_title("RMs: accuracy vs calibration (up-right is better)")
    ax.margins(0.2)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_reward_by_round(path: Path, policies: Sequence[Mapping[str, Any]]) -> bool:
    by_arm: dict[str, list[Mapping[str, Any]]] = {}
    for p in policies:
        if p["mean_reward"] is not None:
            by_arm.setdefault(p["arm"], []).append(p)
    if not by_arm:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.4, 4.8))
    n = len(by_arm)
    for i, arm in enumerate(sorted(by_arm, key=_arm_key)):
        rows = sorted(by_arm[arm], key=lambda p: p["round"])
        offset = (i - (n - 1) / 2) * 0.04  # keep overlapping error bars apart
        ax.errorbar([p["round"] + offset for p in rows], [p["mean_reward"] for p in rows],
                    yerr=[p["reward_stderr"] or 0.0 for p in rows], marker="o", capsize=3,
                    color=ARM_COLORS.get(arm), label=arm_label(arm))
    rounds = sorted({p["round"] for p in policies})
    ax.set_xticks(rounds)
    ax.set_xlabel("round (0 = starting policy)")
    eval_rm = next((p["eval_rm"] for p in policies if p.get("eval_rm")), None)
    ax.set_ylabel("mean evaluation-RM score of test answers" + (f"\n({eval_rm})" if eval_rm else ""))
    ax.set_title("Policies by round (error bars: stderr)")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def _plot_judge(path: Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    if not rows:
        return False
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(7.5, 0.7 * len(rows) + 1.8))
    parts = [("win", "tab:green"), ("tie", "tab:gray"), ("loss", "tab:red"),
             ("inconsistent", "gold"), ("invalid", "black")]
    labels = [f"{r['arm_label']} vs {r['baseline']}" for r in rows]
    left = [0.0] * len(rows)
    for key, color in parts:
        widths = [r[f"{key}_rate"] or 0.0 for r in rows]
        if key in ("inconsistent", "invalid") and not any(widths):
            continue
        bars = ax.barh(labels, widths, left=left, color=color, label=key, edgecolor="white")
        for bar, w, r in zip(bars, widths, rows):
            if w >= 0.06:
                ax.text(bar.get_x() + w / 2, bar.get_y() + bar.get_height() / 2, f"{w:.0%}\n({r[key]})",
                        ha="center", va="center", fontsize=8, color="white" if key != "inconsistent" else "black")
        left = [a + w for a, w in zip(left, widths)]
    ax.set_xlim(0, 1)
    ax.set_xlabel("share of comparisons")
    ax.invert_yaxis()
    ax.set_title("LLM-as-judge (both orders asked)")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.25), ncol=5, fontsize=8, frameon=False)
    return _save(fig, path)


# -- the report ----------------------------------------------------------------------------------
def _eval_rm_rows(records: Sequence[Mapping[str, Any]]) -> tuple[list[str], list[list[Any]]]:
    """Every evaluation RM's mean score per (arm, round), when a run has more than one."""
    rms = list(dict.fromkeys(k for r in records for k in (r.get("policy_rewards") or {})))
    if len(rms) < 2:
        return rms, []
    rows = []
    for rec in _sorted_records(records):
        cells = []
        for rm in rms:
            score = (rec.get("policy_rewards") or {}).get(rm) or {}
            mean, err = _num(score.get("mean")), _num(score.get("stderr"))
            cells.append(MISSING if mean is None else f"{mean:.3f}" + ("" if err is None else f" ± {err:.3f}"))
        rows.append([arm_label(str(rec.get("rm_mode", "?"))), rec.get("round"), *cells])
    return rms, rows


_RM_CSV = ["rm", "name", "arm", "arms", "round", *_RM_METRICS]
_POLICY_CSV = ["arm", "arm_label", "round", "policy", "rm", "eval_rm", "mean_reward", "reward_stderr",
               "best_of_s_mean_score", "apo_pairs", "test_queries", "eval_rm_test_acc", "eval_rm_test_ece",
               "rm_apo_acc_before", "rm_apo_acc_after"]


def _paired_comparisons(out: Path, records: Sequence[Mapping[str, Any]],
                        judge: Mapping[str, Mapping[str, Any]] | None) -> dict | None:
    """The run's paired comparisons with bootstrap intervals (:func:`apo_ray.outputs.claims.run_comparisons`)
    when its phase store (the per-item scores) is beside the report; None otherwise."""
    if not (out / "phases").is_dir():
        return None
    return run_comparisons(out, records, judge)


def no_op_phases(records: list[dict]) -> list[str]:
    """Loud notes for training phases that skipped optimiser steps (non-finite gradients, e.g. a huge
    ``apo.beta2``): a phase that skipped every step left its model as it was."""
    notes = []
    for r in records:
        for key, what in (("rm_train", "RM"), ("policy_train", "policy")):
            stats = r.get(key) or {}
            skipped, steps = int(stats.get("skipped_steps") or 0), int(stats.get("steps") or 0)
            if skipped:
                verdict = "**every** optimiser step was skipped: the phase changed nothing" if skipped >= steps else \
                    f"{skipped} of {steps} optimiser steps were skipped"
                notes.append(f"**WARNING: {r.get('rm_mode')} round {r.get('round')}, {what} training: {verdict} "
                             f"(non-finite gradients; check apo.beta2, apo.apo_weight and the learning rates)**")
    return notes


def write_report(output_dir: str | Path, records: Sequence[Mapping[str, Any]], *,
                 judge: Mapping[str, Mapping[str, Any]] | None = None, notes: Sequence[str] | None = None,
                 title: str = "APO run", judge_baseline: str = "RJS") -> Path:
    """Write ``report.md``, the PNG figures, ``rm_table.csv``, ``policy_table.csv`` and
    ``report.json`` into ``output_dir``; returns the path of ``report.md``.

    ``records``: the content of ``summary.json``. ``judge``: arm -> :func:`apo_ray.core.metrics.summarize_judgements`
    output (that arm's policy vs ``judge_baseline``). ``notes``: free lines under the title.
    """
    out = Path(output_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = list(records)
    rms = rm_table(records)
    policies = policy_table(records)
    phases, wall = wall_time_table(records)
    judge_rows = _judge_rows(judge, judge_baseline) if judge else []
    arms = _arms(records)
    rounds = sorted({p["round"] for p in policies})

    figures: dict[str, str] = {}
    for name, ok in (("reliability.png", _plot_reliability(out / "reliability.png", rms)),
                     ("fig2_acc_vs_ece.png", _plot_acc_vs_ece(out / "fig2_acc_vs_ece.png", rms)),
                     ("fig2_reward_by_round.png", _plot_reward_by_round(out / "fig2_reward_by_round.png", policies)),
                     ("fig3_judge.png", _plot_judge(out / "fig3_judge.png", judge_rows))):
        if ok:
            figures[name] = str(out / name)

    md: list[str] = [f"# {title}", ""]
    if any(r.get("eval_rm_is_rm_base") for r in records):
        md += [f"> **{scored_by_rm_base_warning(arms)}**", ""]
    auto_notes = []
    for key, what in (("eval_rm", "evaluation RM"), ("gold_source", "gold answers")):
        vals = sorted({str(r[key]) for r in records if r.get(key) is not None})
        if vals:
            auto_notes.append(f"{what}: {', '.join(vals)}")
    skipped = sum(int(r.get("queries_skipped_all_empty") or 0) for r in records)
    empty = sum(int(r.get("empty_samples") or 0) for r in records)
    if empty:
        auto_notes.append(f"empty samples: {empty}, never picked as best-of-S; {skipped} query-rounds had only "
                          "empty samples and were left out of the policy update")
    auto_notes.extend(no_op_phases(records))
    tq = sorted({int(r["test_queries"]) for r in records if _num(r.get("test_queries")) is not None})
    if tq:
        auto_notes.append(f"test queries per evaluation: {', '.join(map(str, tq))}")
    auto_notes.append(f"arms: {', '.join(arms) or MISSING}; rounds: {', '.join(map(str, rounds)) or MISSING}")
    all_notes = list(dict.fromkeys([*(notes or []), *auto_notes]))  # a re-written report keeps one copy
    md += [f"- {n}" for n in all_notes] + [""]

    md += ["## Table 2 — Reward models: test accuracy / ECE", "",
           ("One row per distinct RM. Test Acc with its 95% Wilson interval over the test pairs. ECE: weighted "
            "(authors' code), ACE: the paper's formula (mean |observed - predicted| over non-empty bins), "
            "MCE: max over bins; all on the test split."), "",
           format_markdown_table(
               ["RM", "arm", "round", "Dev Acc (%)", "Dev ECE", "Test Acc (%) [95% CI]", "Test pairs", "Test ECE",
                "Test ACE", "MCE"],
               [[r["name"], ", ".join(r["arms"]), r["round"], _fmt(r["dev_acc"], 2, 100), _fmt(r["dev_ece"], 4),
                 _acc_with_interval(r), r["test_pairs"] or MISSING, _fmt(r["test_ece"], 4), _fmt(r["test_ace"], 4),
                 _fmt(r["test_mce"], 4)] for r in rms]), ""]
    md += [what_rm_base_shows(rms), ""] if rms else []

    cells = {(p["arm"], p["round"]): p for p in policies}

    def score(arm: str, r: int) -> str:
        p = cells.get((arm, r))
        if p is None or p["mean_reward"] is None:
            return MISSING
        return _fmt(p["mean_reward"], 3) + ("" if p["reward_stderr"] is None else f" ± {p['reward_stderr']:.3f}")

    md += ["## Table 3 — Policies: mean evaluation-RM score of test answers", "",
           format_markdown_table(["Arm", *[("Round 0 (start)" if r == 0 else f"Round {r}") for r in rounds]],
                                 [[arm_label(a), *[score(a, r) for r in rounds]] for a in arms]), ""]

    md += eval_rm_quality_md(records)
    apo_rows = [[arm_label(str(r.get("rm_mode"))), r.get("round"), _fmt(r.get("rm_apo_acc_before"), 1, 100),
                 _fmt(r.get("rm_apo_acc_after"), 1, 100), r.get("apo_pairs")]
                for r in _sorted_records(records) if r.get("rm_apo_acc_before") is not None]
    if apo_rows:
        md += ["### The RM update on D_APO: gold answer scored above the policy's sample (%)", "",
               ("Before: the round's starting RM; after: the RM the round trained. The APO term pushes this up; "
                "an RM that already ranks gold first has little left to learn from D_APO."), "",
               format_markdown_table(["Arm", "Round", "before (%)", "after (%)", "APO pairs"], apo_rows), ""]

    eval_rms, eval_rows = _eval_rm_rows(records)
    if eval_rows:
        md += ["### The same test answers under every evaluation RM", "",
               format_markdown_table(["Arm", "Round", *[f"`{rm}`" for rm in eval_rms]], eval_rows), ""]

    if judge_rows:
        md += ["## LLM-as-judge", "",
               format_markdown_table(["Arm", "vs", "n", "win", "tie", "loss", "inconsistent", "invalid",
                                      "win rate", "loss rate"],
                                     [[j["arm_label"], j["baseline"], j["n"], j["win"], j["tie"], j["loss"],
                                       j["inconsistent"], j["invalid"], _fmt(j["win_rate"], 3),
                                       _fmt(j["loss_rate"], 3)] for j in judge_rows]), ""]

    paired = _paired_comparisons(out, records, judge)
    if paired is not None:
        md += comparisons_md(paired)
        if plot_comparisons(out / "paired_differences.png", paired):
            md += ["![paired differences with 95% bootstrap intervals](paired_differences.png)", ""]

    if wall:
        md += ["## Wall time per phase (s, summed over arms)", "",
               f"Set-up phases ({', '.join(SHARED_SETUP_PHASES)}) counted once; total excludes `*_total`.", "",
               format_markdown_table(["Round", *phases, "total"],
                                     [[w["round"], *[_fmt(w[p], 1) for p in phases], _fmt(w["total"], 1)]
                                      for w in wall]), ""]

    captions = {"fig2_acc_vs_ece.png": "Figure 2 (left): accuracy vs -ECE per RM",
                "fig2_reward_by_round.png": "Figure 2 (right): evaluation-RM score by round",
                "fig3_judge.png": "Figure 3: judge win/tie/loss vs baseline",
                "reliability.png": "Reliability diagrams per RM"}
    if figures:
        md += ["## Figures", ""]
        for name in ("fig2_acc_vs_ece.png", "fig2_reward_by_round.png", "fig3_judge.png", "reliability.png"):
            if name in figures:
                md += [f"### {captions[name]}", "", f"![{captions[name]}]({name})", ""]

    md += ["## Files", "", "- `rm_table.csv`, `policy_table.csv`, `report.json`: the tables as data.", ""]
    report = out / "report.md"
    report.write_text("\n".join(md))

    _write_csv(out / "rm_table.csv", _RM_CSV, rms)
    _write_csv(out / "policy_table.csv", _POLICY_CSV, policies)
    data = {"title": title, "notes": all_notes,
            "rm_table": [{k: v for k, v in r.items()} for r in rms], "policy_table": policies,
            "wall_time": {"phases": phases, "rows": wall}, "judge": judge_rows,
            "figures": sorted(figures)}
    if paired is not None:
        data["paired_differences"] = paired
    (out / "report.json").write_text(json.dumps(jsonable(data), indent=2, default=str) + "\n")
    return report
