"""Paired comparisons inside one run, and the paper's claims judged across runs (seeds).

Run folders in, numbers, tables and figures out; the interval math is
:mod:`apo_ray.core.metrics`. A run folder is what ``jobs/apo.py`` writes (``summary.json``,
``resolved_config.json``, ``phases/``); per-item scores are read from its phase store
(:meth:`apo_ray.game.store.PhaseStore.get`), never from the files directly:

- ``scores/<rm id>/test/chosen`` and ``.../rejected``: an RM's rewards of the test pairs;
- ``scores/<eval rm id>/<policy id>/test``: an evaluation RM's scores of a policy's test answers.

Every policy of a run answers the same test prompts, and every RM scores the same test pairs, so
two models are compared item by item: the paired bootstrap resamples test items, not models.

:func:`run_comparisons` — within one run: each RM against RM_Base and RM_Base-AB of its round
(and a sequential RM against its own round-1 RM), in test accuracy and ECE; each policy against
the judge's baseline arm (RJS) of its round, in evaluation-RM score; the judge's win rate.

:func:`judge_claims` / :func:`write_claims_report` — across runs that differ only in ``run.seed``
(``data.seed`` fixed, so every run has the same test items): each claim of the paper (``CLAIMS``)
with each seed's paired difference and interval, the seeds pooled (a bootstrap over the test items
shared by every seed, of the mean over seeds, widened by the across-seed spread), a verdict, and
how many test items or seeds would decide it.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np

from apo_ray.core.arms import ARM_TABLE, get_arm, judge_baseline
from apo_ray.core.inference import (
    Components,
    crossed_interval,
    holm,
    items_needed,
    power,
    seeds_needed,
    verdict,
)
from apo_ray.core.metrics import (
    mean_difference_interval,
    paired_bootstrap,
    proportion_interval,
    rm_difference_interval,
    weighted_ece,
)
from apo_ray.game.store import TEST_SOURCES_KEY, PhaseStore
from apo_ray.outputs.tables import (
    ARM_COLORS,
    ARM_LABELS,
    arm_label,
    format_markdown_table,
    jsonable,
    pyplot,
    rm_display_name,
)

__all__ = ["CLAIMS", "Claim", "judge_claims", "load_run", "run_comparisons", "write_claims_report"]

N_RESAMPLES = 2000
BOOTSTRAP_SEED = 0
CONFIDENCE = 0.95
POWER = 0.8
BASE_RM = "rm/base"


# -- reading a run -------------------------------------------------------------------------------
@dataclass
class Run:
    """One finished run: its folder, records (summary.json), resolved config and phase store."""

    dir: Path
    records: list[dict]
    config: dict
    store: Any  # apo_ray.game.store.PhaseStore, read-only use

    @property
    def seed(self) -> int:
        return int(self.config.get("run", {}).get("seed", 0))

    @property
    def n_bins(self) -> int:
        return int(self.config.get("eval", {}).get("n_bins", 10))

    def record(self, arm: str, round_no: int) -> dict | None:
        return next((r for r in self.records if r["rm_mode"] == arm and r["round"] == round_no), None)

    def rm_scores(self, rm_id: str) -> tuple[np.ndarray, np.ndarray] | None:
        """[N] rewards of the chosen and of the rejected test responses under ``rm_id``."""
        good, bad = self.store.get(f"scores/{rm_id}/test/chosen"), self.store.get(f"scores/{rm_id}/test/rejected")
        if good is None or bad is None:
            return None
        return np.asarray(good, dtype=np.float64), np.asarray(bad, dtype=np.float64)

    def test_sources(self) -> list[str] | None:
        """[N] the data source of each test pair (``PreferencePair.source``); None for a run written
        before the game stored them, or when no pair names its source."""
        sources = self.store.get(TEST_SOURCES_KEY)
        return list(sources) if sources and any(sources) else None

    def policy_scores(self, eval_rm: str, policy_id: str) -> np.ndarray | None:
        """[Q] scores of ``policy_id``'s test answers under the evaluation RM ``eval_rm``."""
        scores = self.store.get(f"scores/{eval_rm}/{policy_id}/test")
        return None if scores is None else np.asarray(scores, dtype=np.float64)


def read_json_file(path: Path) -> Any:
    """A run's JSON file; a damaged one (e.g. cut short) is an error naming the file and the place."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path}: not valid JSON (line {exc.lineno}, column {exc.colno}: {exc.msg})") from None


def load_run(run_dir: str | Path, records: Sequence[Mapping] | None = None) -> Run:
    """The run in ``run_dir``; ``records`` default to its ``summary.json``."""
    run_dir = Path(run_dir)
    phases = run_dir / "phases"
    if not phases.is_dir():
        raise FileNotFoundError(f"{run_dir}: no phases/ folder (not a finished apo_ray run?)")
    if records is None:
        summary = run_dir / "summary.json"
        if not summary.exists():
            raise FileNotFoundError(f"{summary} is missing (the run did not finish?)")
        records = read_json_file(summary)
    config_path = run_dir / "resolved_config.json"
    config = read_json_file(config_path) if config_path.exists() else {}
    return Run(run_dir, [dict(r) for r in records], config, PhaseStore(phases, system=None))


ITEM_SCORE_FIELDS = ("seed", "kind", "model", "scorer", "item", "score_a", "score_b", "source")


def item_score_rows(run: Run) -> list[dict]:
    """Every per-item score the claims are computed from, one row per (model, scorer, test item):
    ``rm_test_pair`` rows (an RM's rewards of the i-th test pair's chosen = score_a and rejected =
    score_b response) and ``policy_test_answer`` rows (an evaluation RM's score of a policy's answer
    to the i-th test prompt). Item i is the i-th test pair / prompt of the run's split (data.seed);
    ``source`` is the data source of a test pair ("" when the run did not record it)."""
    rows: list[dict] = []
    sources = run.test_sources()
    rm_ids = list(dict.fromkeys([BASE_RM, *(r["rm"] for r in run.records),
                                 *(k for r in run.records for k in (r.get("eval_rm_quality") or {}))]))
    for rm_id in rm_ids:
        scores = run.rm_scores(rm_id)
        if scores is None:
            continue
        rows += [{"seed": run.seed, "kind": "rm_test_pair", "model": rm_id, "scorer": rm_id, "item": i,
                  "score_a": float(g), "score_b": float(b), "source": sources[i] if sources else ""}
                 for i, (g, b) in enumerate(zip(*scores))]
    done = set()
    for rec in run.records:
        for eval_rm in rec.get("policy_rewards") or {rec.get("eval_rm"): None}:
            key = (rec["policy"], eval_rm)
            if key in done or eval_rm is None:
                continue
            done.add(key)
            scores = run.policy_scores(eval_rm, rec["policy"])
            if scores is not None:
                rows += [{"seed": run.seed, "kind": "policy_test_answer", "model": rec["policy"], "scorer": eval_rm,
                          "item": i, "score_a": float(x), "score_b": "", "source": ""}
                         for i, x in enumerate(scores)]
    return rows


def write_item_scores(path: str | Path, rows: Sequence[Mapping[str, Any]]) -> Path:
    """``item_scores.csv``: the rows of :func:`item_score_rows` (of one run or several seeds)."""
    import csv

    path = Path(path)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=ITEM_SCORE_FIELDS)
        writer.writeheader()
        writer.writerows(rows)
    return path


# -- within one run ------------------------------------------------------------------------------
def _ablation_mode() -> str | None:
    """The mode that is RM_Base-AB: trains its RM from RM_Base without any D_APO."""
    return next((m.name for m in ARM_TABLE.values() if m.rm_init == "base" and not m.trains_on_apo_pairs),
                None)


def _rm_name(rm_id: str, arm: str, round_no: int) -> str:
    return rm_display_name({"rm": rm_id, "rm_mode": arm, "round": round_no})


def _rounds(run: Run) -> list[int]:
    return sorted({int(r["round"]) for r in run.records})


def rm_comparisons(run: Run, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Each distinct RM of rounds >= 1 against RM_Base, against RM_Base-AB of its round, and (an
    RM that continues from its previous round) against its own round-1 RM: A - B in test accuracy
    and in weighted ECE, each with a paired bootstrap interval over the test pairs."""
    ablation = _ablation_mode()
    rows = []
    for r in _rounds(run):
        if r == 0:
            continue
        by_rm: dict[str, list[str]] = {}
        for rec in run.records:
            if rec["round"] == r and rec["rm"] != BASE_RM:
                by_rm.setdefault(rec["rm"], []).append(rec["rm_mode"])
        ab = run.record(ablation, r) if ablation else None
        for rm_id, arms in by_rm.items():
            arm = arms[0]
            against = [("RM_Base", BASE_RM)]
            if ab is not None and ab["rm"] != rm_id:
                against.append((_rm_name(ab["rm"], ablation, r), ab["rm"]))
            for a in arms:
                first = run.record(a, 1)
                if get_arm(a).rm_init == "previous" and r >= 2 and first and first["rm"] != rm_id:
                    against.append((f"{_rm_name(first['rm'], a, 1)} (its round-1 RM)", first["rm"]))
                    break
            mine = run.rm_scores(rm_id)
            for vs_name, vs_id in against:
                theirs = run.rm_scores(vs_id)
                if mine is None or theirs is None:
                    continue
                row = {"round": r, "rm": rm_id, "name": _rm_name(rm_id, arm, r), "arms": arms,
                       "vs": vs_name, "vs_rm": vs_id}
                for metric in ("acc", "ece"):
                    row[metric] = rm_difference_interval(*mine, *theirs, metric=metric, n_bins=run.n_bins,
                                                         n_resamples=n_resamples, seed=seed)
                rows.append(row)
    return rows


def policy_comparisons(run: Run, *, n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED) -> list[dict]:
    """Each distinct policy of rounds >= 1 against the judge baseline arm's (RJS) policy of the
    same round, under every evaluation RM of the run: mean over test prompts of the paired score
    difference, with its bootstrap interval over the prompts."""
    baseline = judge_baseline().name
    rows = []
    for r in _rounds(run):
        base = run.record(baseline, r)
        if r == 0 or base is None:
            continue
        by_policy: dict[str, list[dict]] = {}
        for rec in run.records:
            if rec["round"] == r and rec["rm_mode"] != baseline and rec["policy"] != base["policy"]:
                by_policy.setdefault(rec["policy"], []).append(rec)
        for policy_id, recs in by_policy.items():
            for eval_rm in recs[0].get("policy_rewards") or {recs[0]["eval_rm"]: None}:
                mine, theirs = run.policy_scores(eval_rm, policy_id), run.policy_scores(eval_rm, base["policy"])
                if mine is None or theirs is None:
                    continue
                rows.append({"round": r, "policy": policy_id, "arms": [x["rm_mode"] for x in recs],
                             "vs": judge_baseline().label, "vs_policy": base["policy"], "eval_rm": eval_rm,
                             "primary": eval_rm == recs[0]["eval_rm"], "mean": float(mine.mean()),
                             "vs_mean": float(theirs.mean()),
                             "diff": mean_difference_interval(mine, theirs, n_resamples=n_resamples, seed=seed)})
    return rows


def judge_intervals(judge: Mapping[str, Mapping[str, Any]] | None) -> list[dict]:
    """Per judged arm: win and loss rates over all comparisons (invalid and inconsistent count in
    n) and the win share of the decided ones (win / (win + loss)), each with its Wilson interval."""
    rows = []
    for arm, s in (judge or {}).items():
        n, win, loss = int(s.get("n", 0)), int(s.get("win", 0)), int(s.get("loss", 0))
        rows.append({"arm": arm, "n": n, "win": win, "loss": loss, "win_rate": proportion_interval(win, n),
                     "loss_rate": proportion_interval(loss, n),
                     "win_of_decided": proportion_interval(win, win + loss)})
    return rows


def run_comparisons(run_dir: str | Path, records: Sequence[Mapping] | None = None,
                    judge: Mapping[str, Mapping[str, Any]] | None = None, *, n_resamples: int = N_RESAMPLES,
                    seed: int = BOOTSTRAP_SEED) -> dict[str, Any]:
    """Every paired comparison of one run: ``{"rm": [...], "policy": [...], "judge": [...],
    "n_resamples", "seed", "confidence"}`` (see :func:`rm_comparisons`, :func:`policy_comparisons`,
    :func:`judge_intervals`). ``judge`` defaults to the run's ``judge_summary.json``."""
    run = load_run(run_dir, records)
    if judge is None and (run.dir / "judge_summary.json").exists():
        judge = read_json_file(run.dir / "judge_summary.json")
    return {"rm": rm_comparisons(run, n_resamples=n_resamples, seed=seed),
            "policy": policy_comparisons(run, n_resamples=n_resamples, seed=seed),
            "judge": judge_intervals(judge), "n_resamples": n_resamples, "seed": seed, "confidence": CONFIDENCE}


# -- the paper's claims --------------------------------------------------------------------------
@dataclass(frozen=True)
class Claim:
    """One claim of the paper as a paired comparison A - B whose sign the paper states.

    ``a``/``b``: (arm, round) of the two models; round ``-1`` is the last round of the runs; arm
    ``"base"`` is RM_Base. ``kind``: "rm" (compared on the test pairs, ``metric`` "acc" or "ece")
    or "policy" (their test answers under the run's primary evaluation RM, ``metric`` "score").
    ``sign``: +1 when the paper says A > B, -1 when A < B. ``paper``: the paper's numbers;
    ``paper_effect``: its A - B where the units are comparable with ours (accuracy, ECE), else None.
    """

    key: str
    text: str
    kind: str
    metric: str
    a: tuple[str, int]
    b: tuple[str, int]
    sign: int
    paper: str
    paper_effect: float | None = None


def claims_for(rounds: int) -> list[Claim]:
    """The paper's claims (Tables 2 and 3, section 5) for runs of ``rounds`` rounds."""
    claims = [
        Claim("rm_acc_vs_base", "APO RM (RM_APO-v1) more accurate than RM_Base", "rm", "acc",
              ("apo", 1), ("base", 0), +1, "64.17 vs 63.04 %", 0.0113),
        Claim("rm_acc_vs_ab", "APO RM (RM_APO-v1) more accurate than RM_Base-AB", "rm", "acc",
              ("apo", 1), ("ablation", 1), +1, "64.17 vs 63.53 %", 0.0064),
        Claim("rm_ece_vs_base", "APO RM (RM_APO-v1) less well calibrated than RM_Base (higher ECE)", "rm", "ece",
              ("apo", 1), ("base", 0), +1, "0.064 vs 0.019", 0.045),
        Claim("rm_ece_vs_ab", "APO RM (RM_APO-v1) less well calibrated than RM_Base-AB (higher ECE)", "rm", "ece",
              ("apo", 1), ("ablation", 1), +1, "0.064 vs 0.046", 0.018),
    ]
    paper_policy = {1: "1.610 vs 1.546", 2: "1.975 vs 1.896", 3: "2.204 vs 2.106"}
    claims.insert(0, Claim("rjs_improves", f"RJS improves the policy: RJS round {rounds} above the initial policy",
                           "policy", "score", ("fixed", -1), ("fixed", 0), +1,
                           f"RM_All {paper_policy.get(rounds, '-').split(' vs ')[1]} vs 1.246 (Alpaca)"))
    claims.append(Claim("policy_vs_ab_r1", "APO-v1's policy above RM_Base-AB's policy in round 1 (the ablation)",
                        "policy", "score", ("apo", 1), ("ablation", 1), +1,
                        "direction (section 5: APO's gain is not RM_Base-AB's extra fine-tuning)"))
    for r in range(1, rounds + 1):
        claims.append(Claim(f"policy_r{r}", f"APO policy above RJS in round {r}", "policy", "score",
                            ("apo", r), ("fixed", r), +1, f"RM_All {paper_policy.get(r, '-')}"))
    if rounds >= 2:
        claims.append(Claim("seq_rm_ece", f"APO-seq's RM worse over rounds: RM_APO-v{rounds}seq less well "
                            "calibrated than RM_APO-v1", "rm", "ece", ("apo_seq", rounds), ("apo_seq", 1), +1,
                            "0.104 (v3seq) vs 0.064 (v1)", 0.040))
        claims.append(Claim("seq_policy_last", f"APO-seq's policy below APO's in round {rounds} (its RM over-fits)",
                            "policy", "score", ("apo_seq", rounds), ("apo", rounds), -1,
                            "RM_All 1.947 vs 2.204 (round 3)"))
    return claims


CLAIMS = claims_for(3)


def _record_or_lineage(run: Run, arm: str, r: int) -> dict | None:
    """``arm``'s round-``r`` record, or that of an arm whose round r *is* ``arm``'s (apo_seq's round 1
    is apo's: a run of apo_seq alone still answers the claims about RM_APO-v1)."""
    rec = run.record(arm, r)
    if rec is not None:
        return rec
    for mode in ARM_TABLE.values():
        if mode.lineage(r) == arm and mode.name != arm:
            rec = run.record(mode.name, r)
            if rec is not None:
                return rec
    return None


def _side_arrays(run: Run, claim: Claim) -> list[np.ndarray] | None:
    """The per-item arrays of A then B for one run, or None when the run lacks either model."""
    last = max(_rounds(run))
    out = []
    for arm, r in (claim.a, claim.b):
        r = last if r == -1 else r
        if claim.kind == "rm":
            if arm == "base":
                rm_id = BASE_RM
            else:
                rec = _record_or_lineage(run, arm, r)
                if rec is None:
                    return None
                rm_id = rec["rm"]
            scores = run.rm_scores(rm_id)
            if scores is None:
                return None
            out.extend(scores)
        else:
            rec = _record_or_lineage(run, arm, r)
            if rec is None:
                return None
            scores = run.policy_scores(rec["eval_rm"], rec["policy"])
            if scores is None:
                return None
            out.append(scores)
    return out


def _claim_statistic(claim: Claim, n_runs: int, n_bins: int):
    """statistic(*arrays, axis) = the mean over runs of each run's A - B; the arrays are the runs'
    A then B arrays one run after another (2 per model for RMs, 1 for policies)."""
    per_model = 2 if claim.kind == "rm" else 1

    def model_value(arrays, axis):
        if claim.metric == "acc":
            return np.mean(arrays[0] > arrays[1], axis=axis)
        if claim.metric == "ece":
            return weighted_ece(arrays[0], arrays[1], n_bins, axis)
        return np.mean(arrays[0], axis=axis)

    def statistic(*arrays, axis=-1):
        step = 2 * per_model
        diffs = [model_value(arrays[i:i + per_model], axis) - model_value(arrays[i + per_model:i + step], axis)
                 for i in range(0, n_runs * step, step)]
        return np.mean(diffs, axis=0)

    return statistic


def judge_claims(runs: Sequence[Run], claims: Sequence[Claim] | None = None, *, n_resamples: int = N_RESAMPLES,
                 seed: int = BOOTSTRAP_SEED, kinds: Sequence[str] | None = None) -> list[dict]:
    """Each claim over ``runs`` (runs that differ only in ``run.seed``; :mod:`apo_ray.core.inference`
    has the model and its reasons).

    Per run: A - B with its paired bootstrap interval over the test items. Pooled: the mean over
    runs of A - B with the crossed seed x item model's standard error (the per-seed bootstrap
    variances, the bootstrap variance of the mean over runs with the same items drawn in every run,
    and the spread of the runs), a t interval with Satterthwaite df and a two-sided p-value; Holm's
    adjustment over the claims measured here; verdict: "held" / "not held" when the adjusted p <
    0.05, by the sign of the estimate, else "undecided". Power (tested at 0.05 / m, Holm's first
    step, m claims measured) at the paper's effect where its units are ours (accuracy, ECE): now,
    and the seeds (at these test items) and test items (at these seeds) for 80%.
    """
    if not runs:
        raise ValueError("judge_claims needs at least one run")
    data_cfgs = {json.dumps(r.config.get("data", {}), sort_keys=True) for r in runs}
    if len(data_cfgs) > 1:
        raise ValueError("the runs differ in their data settings (data.*), so their test items differ and cannot be "
                         "pooled: " + ", ".join(str(r.dir) for r in runs))
    rounds = max(max(_rounds(r)) for r in runs)
    claims = list(claims) if claims is not None else claims_for(rounds)
    if kinds is not None:  # the report's family of claims (Holm adjusts over these only)
        claims = [c for c in claims if c.kind in kinds]
    rows = []
    for claim in claims:
        arrays = [_side_arrays(run, claim) for run in runs]
        usable = [(run, a) for run, a in zip(runs, arrays) if a is not None]
        row: dict[str, Any] = {**asdict(claim), "seeds": [run.seed for run, _ in usable]}
        if not usable or len({a[0].size for _, a in usable}) != 1:
            rows.append(row | {"verdict": "not measured", "why": "a model is missing from the runs"
                               if not usable else "the runs' test items differ in number"})
            continue
        n_bins = usable[0][0].n_bins
        per_seed = [paired_bootstrap(_claim_statistic(claim, 1, n_bins), a, n_resamples=n_resamples, seed=seed)
                    for _, a in usable]
        pooled = paired_bootstrap(_claim_statistic(claim, len(usable), n_bins), [x for _, a in usable for x in a],
                                  n_resamples=n_resamples, seed=seed)
        k = len(usable)
        estimates = [p["estimate"] for p in per_seed]
        n_items = int(usable[0][1][0].size)
        crossed = crossed_interval(estimates, [p["se"] ** 2 for p in per_seed], pooled["se"] ** 2, n_items,
                                   confidence=CONFIDENCE)
        row |= {"per_seed": per_seed, "mean": crossed["estimate"],
                "sd_seeds": float(np.std(estimates, ddof=1)) if k > 1 else float("nan"),
                "se_items": pooled["se"], "se_total": crossed["se"], "df": crossed["df"], "t_crit": crossed["t_crit"],
                "low": crossed["low"], "high": crossed["high"], "p": crossed["p"], "n_items": n_items,
                "components": crossed["components"]}
        rows.append(row)
    measured = [r for r in rows if "p" in r]
    for r, adjusted in zip(measured, holm([r["p"] for r in measured])):
        r["p_holm"] = adjusted
        r["verdict"] = verdict(r["mean"], adjusted, r["sign"], alpha=1 - CONFIDENCE)
    m = max(sum(not math.isnan(r["p"]) for r in measured), 1)
    alpha = (1 - CONFIDENCE) / m
    for r in measured:
        r["alpha_power"], r["claims_tested"] = alpha, m
        comp = Components(**r["components"])
        effect = r.get("paper_effect")
        if r["verdict"] == "undecided" and len(r["seeds"]) < 2:
            r["why"] = "one seed: its noise is not measured"
        if effect and not math.isnan(comp.var_seed) and comp.se() == 0:
            r["why"] = "no variance observed (every seed and item gives the same difference): power is not defined"
            effect = None
        if effect and not math.isnan(comp.var_seed):
            effect = effect * r["sign"]
            r["power_paper_effect"] = power(effect, comp, comp.k, comp.n, alpha=alpha)
            r["seeds_needed_paper_effect"] = seeds_needed(effect, comp, comp.n, alpha=alpha, target=POWER)
            r["items_needed_paper_effect"] = items_needed(effect, comp, comp.k, alpha=alpha, target=POWER)
        else:
            r["power_paper_effect"] = r["seeds_needed_paper_effect"] = r["items_needed_paper_effect"] = None
    return rows


# -- the cross-seed report -----------------------------------------------------------------------
def _fmt(x: Any, digits: int = 3, scale: float = 1.0, signed: bool = False) -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "–"
    return f"{x * scale:{'+' if signed else ''}.{digits}f}"


def _scale(metric: str) -> tuple[float, int, str]:
    """(scale, digits, unit) of a metric's differences in tables: accuracy in points."""
    return {"acc": (100.0, 2, " pts"), "ece": (1.0, 3, ""), "score": (1.0, 3, "")}[metric]


def _interval(d: Mapping[str, Any], metric: str) -> str:
    scale, digits, _ = _scale(metric)
    return (f"{_fmt(d['estimate'], digits, scale, True)} [{_fmt(d['low'], digits, scale, True)}, "
            f"{_fmt(d['high'], digits, scale, True)}]")


def _needed(x: float | None) -> str:
    if x is None or not math.isfinite(x):
        return "–" if x is None else "∞"
    return f"{max(1, math.ceil(x)):,}"


def _p(x: float | None) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "–"
    return "<0.001" if x < 0.001 else f"{x:.3f}"


def claims_table_md(rows: Sequence[Mapping[str, Any]]) -> str:
    table = []
    for row in rows:
        if "mean" not in row:
            table.append([row["text"], row["paper"], "–", "–", "–", "–", row["verdict"], "–", "–"])
            continue
        scale, digits, unit = _scale(row["metric"])
        seeds = "; ".join(f"s{s}: {_interval(p, row['metric'])}" for s, p in zip(row["seeds"], row["per_seed"]))
        pooled = (f"{_fmt(row['mean'], digits, scale, True)} [{_fmt(row['low'], digits, scale, True)}, "
                  f"{_fmt(row['high'], digits, scale, True)}]{unit} (t, {_fmt(row['df'], 1)} df)")
        if row.get("power_paper_effect") is None:
            design = ("– (no paper effect in our units)" if not row.get("paper_effect")
                      else "– (one seed)" if len(row["seeds"]) < 2 else "– (no variance observed)")
        else:
            design = (f"{row['power_paper_effect']:.0%} now; {_needed(row['seeds_needed_paper_effect'])} seeds "
                      f"or {_needed(row['items_needed_paper_effect'])} items")
        table.append([row["text"], row["paper"], seeds, pooled, _p(row["p"]), _p(row.get("p_holm")),
                      f"**{row['verdict']}**", f"{len(row['seeds'])} × {row['n_items']}", design])
    return format_markdown_table(
        ["claim (A - B, paper's sign)", "paper", "per seed: A - B [95% CI over items]",
         "over seeds and items [95% CI]", "p", "p (Holm)", "verdict", "seeds × items",
         "power at the paper's effect (80%: seeds at these items / items at these seeds)"], table)


def _plot_claims(path: Path, rows: Sequence[Mapping[str, Any]]) -> bool:
    plt = pyplot()
    rows = [r for r in rows if "mean" in r]
    if plt is None or not rows:
        return False
    groups = [(m, [r for r in rows if r["metric"] == m]) for m in ("acc", "ece", "score")]
    groups = [(m, rs) for m, rs in groups if rs]
    fig, axes = plt.subplots(len(groups), 1, figsize=(9, 1.2 + 0.9 * len(rows)), squeeze=False,
                             gridspec_kw={"height_ratios": [len(rs) for _, rs in groups]})
    titles = {"acc": "test accuracy, A - B (points)", "ece": "test ECE, A - B", "score": "evaluation-RM score, A - B"}
    for ax, (metric, rs) in zip(axes[:, 0], groups):
        scale = _scale(metric)[0]
        for i, row in enumerate(rs):
            y = len(rs) - 1 - i
            for j, p in enumerate(row["per_seed"]):
                off = 0.25 - 0.5 * (j + 1) / (len(row["per_seed"]) + 1)
                ax.errorbar(p["estimate"] * scale, y + off, xerr=[[(p["estimate"] - p["low"]) * scale],
                                                                  [(p["high"] - p["estimate"]) * scale]],
                            fmt="o", ms=3, color="tab:gray", alpha=0.7, capsize=2)
            colour = {"held": "tab:green", "not held": "tab:red"}.get(row["verdict"], "tab:blue")
            ax.errorbar(row["mean"] * scale, y - 0.3, xerr=[[(row["mean"] - row["low"]) * scale],
                                                            [(row["high"] - row["mean"]) * scale]],
                        fmt="D", ms=6, color=colour, capsize=3)
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rs)))
        ax.set_yticklabels([r["key"] for r in reversed(rs)], fontsize=8)
        ax.set_title(titles[metric], fontsize=9)
    fig.suptitle("Claims: each seed (grey, 95% bootstrap CI) and pooled (diamond: green held, red not held, "
                 "blue undecided)", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def _across_seeds(runs: Sequence[Run]) -> tuple[list[dict], list[dict]]:
    """RM rows (name, round, test acc / ECE per seed) and policy rows (arm, round, score per seed)."""
    rms: dict[str, dict] = {}
    policies: dict[tuple[str, int], dict] = {}
    for run in runs:
        for rec in sorted(run.records, key=lambda r: (r["round"], list(ARM_TABLE).index(r["rm_mode"])
                                                      if r["rm_mode"] in ARM_TABLE else 99)):
            name = _rm_name(rec["rm"], rec["rm_mode"], rec["round"])
            row = rms.setdefault(rec["rm"], {"rm": rec["rm"], "name": name, "round": 0 if rec["rm"] == BASE_RM
                                             else rec["round"], "acc": {}, "ece": {}})
            row["acc"][run.seed], row["ece"][run.seed] = rec.get("rm_test_acc"), rec.get("rm_test_ece")
            p = policies.setdefault((rec["rm_mode"], rec["round"]), {"arm": rec["rm_mode"], "round": rec["round"],
                                                                     "rm": rec["rm"], "score": {}, "stderr": {}})
            p["score"][run.seed], p["stderr"][run.seed] = rec.get("policy_mean_reward"), rec.get("policy_reward_stderr")
    order = list(ARM_TABLE)
    return list(rms.values()), sorted(policies.values(), key=lambda p: (
        p["round"], order.index(p["arm"]) if p["arm"] in order else len(order), p["arm"]))


def rm_accuracy_by_source(runs: Sequence[Run], rms: Sequence[Mapping[str, Any]]) -> list[dict]:
    """Each RM's test accuracy on each data source's pairs, per seed: rows ``{"rm", "name", "round",
    "source", "n", "acc": {seed: rate}}`` for ``rms`` (the RM rows of ``_across_seeds``). [] unless
    the runs record their test pairs' sources and there are at least two (descriptive: not one of
    the claims)."""
    rows: dict[tuple[str, str], dict] = {}
    for run in runs:
        sources = run.test_sources()
        if sources is None or len(set(sources)) < 2:
            return []
        labels = np.asarray(sources)
        for rm in rms:
            scores = run.rm_scores(rm["rm"])
            if scores is None:
                continue
            if len(scores[0]) != len(labels):
                raise ValueError(f"{run.dir}: {len(labels)} test-pair sources ({TEST_SOURCES_KEY}) for "
                                 f"{len(scores[0])} test pairs scored by {rm['rm']}")
            wins = scores[0] > scores[1]  # [N] the RM ranks the chosen response first
            for source in dict.fromkeys(sources):
                mine = labels == source
                row = rows.setdefault((rm["rm"], source), {"rm": rm["rm"], "name": rm["name"], "round": rm["round"],
                                                           "source": source, "n": int(mine.sum()), "acc": {}})
                row["acc"][run.seed] = float(wins[mine].mean())
    return list(rows.values())


def by_source_md(rows: Sequence[Mapping[str, Any]], seeds: Sequence[int]) -> list[str]:
    """The report section of :func:`rm_accuracy_by_source`; [] without rows."""
    if not rows:
        return []
    table = []
    for r in rows:
        mean, sd = _mean_sd(r["acc"])
        table.append([r["name"], r["round"], r["source"], r["n"], *[_fmt(r["acc"].get(s), 1, 100) for s in seeds],
                      f"{_fmt(mean, 1, 100)} ± {_fmt(sd, 1, 100)}"])
    return ["## RM test accuracy by data source", "",
            ("Each RM's accuracy on the test pairs of each data source (the sources the loader read, e.g. HH's "
             "harmless-base and helpful-base), per seed, mean ± sd over seeds. Descriptive, not one of the claims "
             "above: it shows whether an RM's pooled accuracy hides subsets it ranks differently."), "",
            format_markdown_table(["RM", "round", "source", "test pairs", *[f"acc s{s} (%)" for s in seeds],
                                   "mean ± sd (%)"], table), ""]


def _mean_sd(values: Mapping[int, Any]) -> tuple[float, float]:
    xs = [float(v) for v in values.values() if v is not None]
    if not xs:
        return float("nan"), float("nan")
    return float(np.mean(xs)), float(np.std(xs, ddof=1)) if len(xs) > 1 else float("nan")


def _plot_by_round(path: Path, rms: Sequence[Mapping], policies: Sequence[Mapping]) -> bool:
    plt = pyplot()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(14, 4))
    arms = list(dict.fromkeys(p["arm"] for p in policies))
    for arm in arms:
        colour = ARM_COLORS.get(arm, None)
        pts = [p for p in policies if p["arm"] == arm]
        xs = [p["round"] + 0.04 * arms.index(arm) for p in pts]
        ms = [_mean_sd(p["score"]) for p in pts]
        axes[2].errorbar(xs, [m for m, _ in ms], yerr=[0 if math.isnan(s) else s for _, s in ms], marker="o",
                         capsize=3, label=arm_label(arm), color=colour)
        by_id = {r["rm"]: r for r in rms}
        rm_pts = [by_id.get(p["rm"]) for p in pts]
        for ax, metric, scale in ((axes[0], "acc", 100.0), (axes[1], "ece", 1.0)):
            vals = [(x, _mean_sd(r[metric])) for x, r in zip(xs, rm_pts) if r is not None]
            ax.errorbar([x for x, _ in vals], [m * scale for _, (m, _) in vals],
                        yerr=[0 if math.isnan(s) else s * scale for _, (_, s) in vals], marker="o", capsize=3,
                        label=arm_label(arm), color=colour)
    for ax, title in zip(axes, ("RM test accuracy (%)", "RM test ECE", "policy: evaluation-RM score")):
        ax.set_title(title + ", mean ± sd over seeds", fontsize=9)
        ax.set_xlabel("round")
        ax.set_xticks(sorted({p["round"] for p in policies}))
    axes[2].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def write_claims_report(run_dirs: Sequence[str | Path], out_dir: str | Path, *, title: str = "APO claims across seeds",
                        notes: Sequence[str] = (), machine: Mapping[str, Any] | None = None,
                        n_resamples: int = N_RESAMPLES, seed: int = BOOTSTRAP_SEED,
                        sections: Sequence[str] = (), kinds: Sequence[str] | None = None) -> Path:
    """``report.md``, ``claims.json`` and figures in ``out_dir`` from runs that differ in ``run.seed``.

    ``notes``: lines under the title (how it was run); ``machine``: what to record about where it ran
    (CPU flags, wall time per seed ...), written into the JSON and shown as a table when it has
    ``per_seed`` rows. ``sections``: markdown blocks placed after the claims' explanation.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    runs = sorted((load_run(d) for d in run_dirs), key=lambda r: r.seed)
    claims = judge_claims(runs, n_resamples=n_resamples, seed=seed, kinds=kinds)
    within = {run.seed: run_comparisons(run.dir, n_resamples=n_resamples, seed=seed) for run in runs}
    rms, policies = _across_seeds(runs)
    seeds = [run.seed for run in runs]
    figures = {}
    if _plot_claims(out / "claims.png", claims):
        figures["claims.png"] = "Each claim: per-seed paired differences and the pooled interval"
    if _plot_by_round(out / "by_round.png", rms, policies):
        figures["by_round.png"] = "RM test accuracy / ECE and policy score by round (mean ± sd over seeds)"

    md = [f"# {title}", ""] + [f"- {n}" for n in notes] + [""]
    if machine and machine.get("per_seed"):
        md += ["## Runs", "", format_markdown_table(
            ["seed", "wall (min)", "CPU time (min)", "output"],
            [[r["seed"], _fmt(r.get("wall_seconds"), 1, 1 / 60), _fmt(r.get("cpu_seconds"), 1, 1 / 60), r.get("dir")]
             for r in machine["per_seed"]]), ""]
        phases = list(dict.fromkeys(k for r in machine["per_seed"] for k in r.get("phase_seconds") or {}))
        if phases:
            md += ["Seconds per kind of phase (summed over rounds and arms; set-up phases once):", "",
                   format_markdown_table(["phase", *[f"seed {r['seed']}" for r in machine["per_seed"]]],
                                         [[ph, *[_fmt((r.get("phase_seconds") or {}).get(ph), 0)
                                                 for r in machine["per_seed"]]] for ph in phases]), ""]
    md += ["## Claims", "", claims_table_md(claims), "",
           ("How to read it: A - B is the first model minus the second, in the paper's direction (the sign the "
            "paper reports is the claim). Per seed: the paired percentile bootstrap over the test items (pairs "
            f"for RMs, prompts for policies), {n_resamples} resamples, seeded. Over seeds and items: the mean over "
            "seeds, its standard error from the crossed seed × item model (apo_ray/core/inference.py: the spread of the "
            "seeds, each seed's bootstrap variance and the bootstrap variance of the mean over seeds, so the "
            "seed × item part is counted once), and Student's t with the Welch-Satterthwaite degrees of freedom "
            "(k - 1 where the seed part dominates). p: two-sided, no difference; p (Holm): Holm's step-down "
            "adjustment over the claims measured in this report (it bounds the chance of any wrong verdict, "
            "whatever the dependence between claims that share a model). One rule: **held** when p (Holm) < 0.05 "
            "and the estimate has the paper's sign, **not held** when p (Holm) < 0.05 and it has the other sign, "
            "**undecided** otherwise. Power: at the paper's own effect size (accuracy and ECE only; the paper's "
            "policy scores are in RM_All units, not ours), tested at 0.05 / m (Holm's first step), from this "
            "report's variance components; then the seeds needed at these test items and the test items needed at "
            "these seeds for 80%. Both are estimates from the observed variance of this setup."), ""]
    if "claims.png" in figures:
        md += [f"![{figures['claims.png']}](claims.png)", ""]
    md += [block.rstrip() + "\n" for block in sections]

    md += ["## Reward models across seeds (test split)", "", format_markdown_table(
        ["RM", "round", *[f"acc s{s} (%)" for s in seeds], "acc mean ± sd", *[f"ECE s{s}" for s in seeds],
         "ECE mean ± sd"],
        [[r["name"], r["round"], *[_fmt(r["acc"].get(s), 2, 100) for s in seeds],
          "{} ± {}".format(*(_fmt(v, 2, 100) for v in _mean_sd(r["acc"]))),
          *[_fmt(r["ece"].get(s), 4) for s in seeds], "{} ± {}".format(*(_fmt(v, 4) for v in _mean_sd(r["ece"])))]
         for r in rms]), ""]
    by_source = rm_accuracy_by_source(runs, rms)
    md += by_source_md(by_source, seeds)
    # One line per evaluation RM when the seeds share it (eval.shared_rm_dir); else one per seed, named.
    per_seed = [(seed, [line for line in eval_rm_quality_md(run.records) if line]) for seed, run in zip(seeds, runs)]
    judges = list(dict.fromkeys(line for _, lines in per_seed for line in lines))
    if len(judges) > max((len(lines) for _, lines in per_seed), default=0):
        judges = [f"- seed {seed}: {line[2:]}" for seed, lines in per_seed for line in lines]
    md += ["## Policies across seeds (mean evaluation-RM score of the test answers)", "", *judges,
           *([""] if judges else []), format_markdown_table(
        ["arm", "round", *[f"s{s} (± stderr)" for s in seeds], "mean ± sd over seeds"],
        [[ARM_LABELS.get(p["arm"], p["arm"]), p["round"],
          *[f"{_fmt(p['score'].get(s))} ± {_fmt(p['stderr'].get(s))}" for s in seeds],
          "{} ± {}".format(*(_fmt(v) for v in _mean_sd(p["score"])))] for p in policies]), ""]

    def within_rows(kind: str) -> list[list[str]]:
        keyed: dict[tuple, dict[int, dict]] = {}
        for s, comp in within.items():
            for row in comp[kind]:
                if kind == "policy" and not row["primary"]:
                    continue
                key = (row["round"], row["name"], row["vs"]) if kind == "rm" else (
                    row["round"], ", ".join(ARM_LABELS.get(a, a) for a in row["arms"]), row["vs"])
                keyed.setdefault(key, {})[s] = row
        lines = []
        for key, by_seed in keyed.items():
            metrics = ("acc", "ece") if kind == "rm" else ("diff",)
            cells = []
            for metric in metrics:
                unit = "score" if metric == "diff" else metric
                cells += [_interval(by_seed[s][metric], unit) if s in by_seed else "–" for s in seeds]
                ests = {s: by_seed[s][metric]["estimate"] for s in by_seed}
                scale, digits, _ = _scale(unit)
                m, sd = _mean_sd(ests)
                cells.append(f"{_fmt(m, digits, scale, True)} ± {_fmt(sd, digits, scale)}")
            lines.append([*map(str, key), *cells])
        return lines

    md += ["## Within each run: paired differences with 95% bootstrap intervals", "",
           ("Each RM against RM_Base and RM_Base-AB of its round (accuracy in points, ECE), then each policy "
           "against RJS of its round (primary evaluation RM), per seed, and the across-seed mean ± sd beside "
           "them."), "",
           format_markdown_table(["round", "RM", "vs", *[f"Δacc s{s}" for s in seeds], "Δacc mean ± sd",
                                  *[f"ΔECE s{s}" for s in seeds], "ΔECE mean ± sd"], within_rows("rm")), "",
           format_markdown_table(["round", "policy of", "vs", *[f"Δscore s{s}" for s in seeds],
                                  "Δscore mean ± sd"], within_rows("policy")), ""]
    if "by_round.png" in figures:
        md += ["## Figures", "", f"![{figures['by_round.png']}](by_round.png)", ""]
    write_item_scores(out / "item_scores.csv", [row for run in runs for row in item_score_rows(run)])
    md += ["## Files", "", ("- `claims.json`: every number above (per-seed intervals, pooled, verdicts, the "
           "within-run comparisons, the machine and timing record)."),
           ("- `item_scores.csv`: every test item's score per model and seed (RM rewards of each test pair's chosen "
            "and rejected response; evaluation-RM scores of each policy's test answers), from which any row above "
            "can be recomputed."), ""]
    (out / "report.md").write_text("\n".join(md))
    data = {"title": title, "notes": list(notes), "machine": machine or {}, "seeds": seeds,
            "runs": [str(r.dir) for r in runs], "claims": claims, "within_run": within,
            "rms_across_seeds": rms, "rm_accuracy_by_source": by_source, "policies_across_seeds": policies, "figures": sorted(figures),
            "n_resamples": n_resamples, "bootstrap_seed": seed, "confidence": CONFIDENCE, "power": POWER}
    (out / "claims.json").write_text(json.dumps(jsonable(data), indent=1, default=str) + "\n")
    return out / "report.md"


def eval_rm_quality_md(records: Sequence[Mapping[str, Any]]) -> list[str]:
    """A line per evaluation RM: its test accuracy (Wilson 95% interval) and ECE, so that a reader
    of the policy rows sees how good their judge is. [] when the records carry none."""
    quality = next((r.get("eval_rm_quality") for r in records if r.get("eval_rm_quality")), None)
    if not quality:
        return []
    lines = []
    for rm, q in quality.items():
        if not q or q.get("acc") is None:
            continue
        ci = proportion_interval(round(q["acc"] * q["n"]), q["n"])
        lines.append(f"- Scored by `{rm}`: test accuracy {q['acc'] * 100:.1f}% [{ci['low'] * 100:.1f}, "
                     f"{ci['high'] * 100:.1f}] (Wilson 95%), ECE {q['ece']:.4f}, on {q['n']} test pairs.")
    return lines + [""] if lines else []


# -- the per-run section of report.md ------------------------------------------------------------
def comparisons_md(comp: Mapping[str, Any]) -> list[str]:
    """Markdown lines of :func:`run_comparisons`' tables (for a run's report.md); [] when empty."""
    if not (comp["rm"] or comp["policy"] or comp["judge"]):
        return []
    md = ["## Paired differences with 95% bootstrap intervals", "",
          (f"A - B over the same test items (pairs for RMs, prompts for policies), percentile bootstrap with "
          f"{comp['n_resamples']} resamples of the items (seed {comp['seed']}); an interval that excludes 0 "
          "separates the two models beyond test-set noise (not beyond seed noise: see a multi-seed claims report)."),
          ""]
    if comp["rm"]:
        md += [format_markdown_table(
            ["round", "RM (A)", "vs (B)", "Δ test acc (pts) [95% CI]", "Δ test ECE [95% CI]", "pairs"],
            [[r["round"], r["name"], r["vs"], _interval(r["acc"], "acc"), _interval(r["ece"], "ece"), r["acc"]["n"]]
             for r in comp["rm"]]), ""]
    if comp["policy"]:
        md += [format_markdown_table(
            ["round", "policy of (A)", "vs (B)", "evaluation RM", "A mean", "B mean", "Δ score [95% CI]", "prompts"],
            [[r["round"], ", ".join(ARM_LABELS.get(a, a) for a in r["arms"]), r["vs"], f"`{r['eval_rm']}`",
              _fmt(r["mean"]), _fmt(r["vs_mean"]), _interval(r["diff"], "score"), r["diff"]["n"]]
             for r in comp["policy"]]), ""]
    if comp["judge"]:
        def rate(d):
            return f"{_fmt(d['rate'])} [{_fmt(d['low'])}, {_fmt(d['high'])}]"
        md += ["Judge (Wilson 95% intervals; rates over all comparisons, invalid and inconsistent included):", "",
               format_markdown_table(["arm", "n", "win rate", "loss rate", "win / (win + loss)"],
                                     [[ARM_LABELS.get(j["arm"], j["arm"]), j["n"], rate(j["win_rate"]),
                                       rate(j["loss_rate"]), rate(j["win_of_decided"])] for j in comp["judge"]]), ""]
    return md


def plot_comparisons(path: Path, comp: Mapping[str, Any]) -> bool:
    """Forest plot of a run's paired differences (RM accuracy, RM ECE, policy score vs RJS)."""
    plt = pyplot()
    panels = [("Δ test accuracy (pts) vs {vs}", "acc", comp["rm"]), ("Δ test ECE", "ece", comp["rm"]),
              ("Δ evaluation-RM score vs RJS", "diff", [r for r in comp["policy"] if r["primary"]])]
    panels = [p for p in panels if p[2]]
    if plt is None or not panels:
        return False
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 1.5 + 0.35 * max(len(p[2]) for p in panels)),
                             squeeze=False)
    for ax, (title, metric, rows) in zip(axes[0], panels):
        scale = 100.0 if metric == "acc" else 1.0
        labels = []
        for i, r in enumerate(rows):
            d = r[metric]
            y = len(rows) - 1 - i
            ax.errorbar(d["estimate"] * scale, y, xerr=[[(d["estimate"] - d["low"]) * scale],
                                                        [(d["high"] - d["estimate"]) * scale]], fmt="o", capsize=3,
                        color="tab:blue")
            labels.append(f"r{r['round']} {r['name']} vs {r['vs']}" if "name" in r else
                          f"r{r['round']} {'/'.join(r['arms'])}")
        ax.axvline(0, color="black", lw=0.8)
        ax.set_yticks(range(len(rows)))
        ax.set_yticklabels(list(reversed(labels)), fontsize=7)
        ax.set_title(title.format(vs="B"), fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True
