"""Evaluation metrics for reward models and LLM-as-judge comparisons.

Pure functions. Score inputs may be torch tensors, numpy arrays or lists of floats (any shape,
flattened); outputs are plain python floats / dicts so they can go straight into JSON logs.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

__all__ = [
    "OUTCOMES",
    "VERDICTS",
    "Outcome",
    "Verdict",
    "calibration_errors",
    "combine_verdicts",
    "mean_and_stderr",
    "mean_difference_interval",
    "paired_bootstrap",
    "parse_judge_verdict",
    "preference_accuracy",
    "proportion_interval",
    "rm_difference_interval",
    "samples_to_decide",
    "summarize_judgements",
    "weighted_ece",
]

# torch.Tensor | np.ndarray | Sequence[float]; spelled Any so this module need not import torch.
ArrayLike = Any

Verdict = Literal["A", "B", "same", "invalid"]
Outcome = Literal["win", "tie", "loss", "inconsistent", "invalid"]
VERDICTS: tuple[str, ...] = ("A", "B", "same", "invalid")
OUTCOMES: tuple[str, ...] = ("win", "tie", "loss", "inconsistent", "invalid")


def _to_numpy(x: ArrayLike) -> np.ndarray:
    """Flatten to a float64 numpy array (torch tensors are detached and moved to CPU)."""
    if hasattr(x, "detach"):  # torch.Tensor; avoid a hard torch import in this module
        # .double() first: numpy has no bfloat16.
        x = x.detach().cpu().double().numpy()
    return np.asarray(x, dtype=np.float64).reshape(-1)


def _pairs(r_good: ArrayLike, r_bad: ArrayLike) -> tuple[np.ndarray, np.ndarray]:
    g, b = _to_numpy(r_good), _to_numpy(r_bad)
    if g.shape != b.shape:
        raise ValueError(f"r_good and r_bad differ in length: {g.size} vs {b.size}")
    if g.size == 0:
        raise ValueError("no pairs given")
    return g, b


def preference_accuracy(r_good: ArrayLike, r_bad: ArrayLike) -> float:
    """Share of pairs with ``r_good > r_bad``.

    Ties (``r_good == r_bad``) count as wrong: an RM that cannot separate the pair has not
    ranked it correctly.

    Args:
        r_good: [N] rewards of the preferred responses.
        r_bad: [N] rewards of the dispreferred responses.
    """
    g, b = _pairs(r_good, r_bad)
    return float(np.mean(g > b))


def _sigmoid(d: np.ndarray) -> np.ndarray:
    # tanh form: no overflow warning from exp(-d) for very negative d.
    return 0.5 * (1.0 + np.tanh(0.5 * d))


def calibration_errors(r_good: ArrayLike, r_bad: ArrayLike, n_bins: int = 10) -> dict[str, Any]:
    """Calibration of the Bradley-Terry probability ``Q = sigmoid(r_good - r_bad)``.

    Both orientations of every pair are scored, giving 2N predictions: ``p`` with label 1 and
    ``1 - p`` with label 0 (otherwise every label would be 1 and the metric would only reward
    confidence). Bins are equal-width over [0, 1], bin index ``min(int(p * n_bins), n_bins - 1)``.

    Returns a dict with:
      * ``ece``: weighted expected calibration error (the authors' code):
        ``sum_b |sum_{i in b}(p_i - y_i)| / (2N)``.
      * ``ace``: average calibration error, the paper's formula: mean over NON-EMPTY bins of
        ``|mean p - mean y|`` (every occupied bin weighs the same, whatever its count).
      * ``mce``: max over non-empty bins of ``|mean p - mean y|``.
      * ``bins``: ``n_bins`` dicts ``{"lo", "hi", "count", "mean_predicted", "observed"}``
        (the two means are ``None`` for empty bins), for reliability diagrams.
      * ``n_predictions``: 2N.
    """
    if n_bins < 1:
        raise ValueError(f"n_bins must be >= 1, got {n_bins}")
    g, b = _pairs(r_good, r_bad)
    p_pos = _sigmoid(g - b)
    p = np.concatenate([p_pos, 1.0 - p_pos])
    y = np.concatenate([np.ones_like(p_pos), np.zeros_like(p_pos)])
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)

    total = p.size
    weighted = 0.0
    gaps: list[float] = []
    bins: list[dict[str, Any]] = []
    for k in range(n_bins):
        sel = idx == k
        count = int(sel.sum())
        entry: dict[str, Any] = {
            "lo": k / n_bins,
            "hi": (k + 1) / n_bins,
            "count": count,
            "mean_predicted": None,
            "observed": None,
        }
        if count:
            mean_p = float(p[sel].mean())
            mean_y = float(y[sel].mean())
            entry["mean_predicted"] = mean_p
            entry["observed"] = mean_y
            weighted += abs(float((p[sel] - y[sel]).sum()))
            gaps.append(abs(mean_p - mean_y))
        bins.append(entry)
    return {
        "ece": weighted / total,
        "ace": float(np.mean(gaps)),
        "mce": float(max(gaps)),
        "bins": bins,
        "n_predictions": total,
    }


def mean_and_stderr(xs: ArrayLike) -> tuple[float, float]:
    """Mean and standard error of the mean (sample std with ddof=1, over sqrt(n)).

    A single value has an undefined standard error: returned as NaN. Empty input raises.
    """
    a = _to_numpy(xs)
    if a.size == 0:
        raise ValueError("mean_and_stderr of an empty sequence")
    if a.size == 1:
        return float(a[0]), float("nan")
    return float(a.mean()), float(a.std(ddof=1) / math.sqrt(a.size))


# --- LLM-as-judge ---------------------------------------------------------------------------

_VERDICT_LINES: dict[str, str] = {
    "[a] is better": "A",
    "[b] is better": "B",
    "equally good": "same",
    "equally bad": "same",
}


def parse_judge_verdict(text: str) -> str:
    """Read the judge's final line into a :data:`Verdict`.

    Only the last non-empty line counts (the judge is asked to reason first and end with the
    verdict). Markdown emphasis (``*``, ``**``, ``_``, backticks), surrounding quotes, whitespace
    and a trailing period are stripped, case is ignored. Accepted lines: "[A] is better" -> "A",
    "[B] is better" -> "B", "equally good" / "equally bad" -> "same"; anything else -> "invalid".
    """
    lines = [ln for ln in text.splitlines() if ln.strip()]
    if not lines:
        return "invalid"
    line = lines[-1]
    line = re.sub(r"[*`_\"']", "", line).strip()
    line = line.rstrip(".").strip()
    line = re.sub(r"\s+", " ", line).lower()
    return _VERDICT_LINES.get(line, "invalid")


_SWAP = {"A": "B", "B": "A", "same": "same", "invalid": "invalid"}


def combine_verdicts(first: str, second_swapped: str) -> str:
    """Combine the two position-swapped judge verdicts into an :data:`Outcome` for "ours".

    Args:
        first: verdict with A = ours, B = theirs.
        second_swapped: verdict of the same comparison with positions swapped (A = theirs), so it
            is mapped back (A <-> B) before combining.
    Rules (paper): both A -> "win"; both B -> "loss"; both same -> "tie"; A + same -> "win";
    B + same -> "loss". A vs B disagreement, which the paper leaves unstated, is "inconsistent"
    (it may be counted as a tie downstream, but is kept separate here). Any invalid -> "invalid".
    """
    for v in (first, second_swapped):
        if v not in _SWAP:
            raise ValueError(f"unknown verdict {v!r}; expected one of {VERDICTS}")
    second = _SWAP[second_swapped]
    pair = {first, second}
    if "invalid" in pair:
        return "invalid"
    if pair == {"A", "B"}:
        return "inconsistent"
    if "A" in pair:  # {A} or {A, same}
        return "win"
    if "B" in pair:  # {B} or {B, same}
        return "loss"
    return "tie"  # {same}


def summarize_judgements(outcomes: Sequence[str]) -> dict[str, float | int]:
    """Counts and rates of judge outcomes.

    Returns ``{"n", "win", "tie", "loss", "inconsistent", "invalid", "win_rate", "tie_rate",
    "loss_rate", "inconsistent_rate", "invalid_rate"}``. Rates are over ALL outcomes (invalid and
    inconsistent included), so they sum to 1; with no outcomes they are NaN.
    """
    counts = {k: 0 for k in OUTCOMES}
    for o in outcomes:
        if o not in counts:
            raise ValueError(f"unknown outcome {o!r}; expected one of {OUTCOMES}")
        counts[o] += 1
    n = len(outcomes)
    result: dict[str, float | int] = {"n": n, **counts}
    for k in OUTCOMES:
        result[f"{k}_rate"] = counts[k] / n if n else float("nan")
    return result


# --- Intervals: paired bootstrap over test items, proportions, sample sizes -----------------------


def weighted_ece(r_good: np.ndarray, r_bad: np.ndarray, n_bins: int = 10, axis: int = -1) -> np.ndarray:
    """The weighted ECE of :func:`calibration_errors` (``"ece"``), vectorised over leading axes.

    ``r_good``/``r_bad``: [..., N] rewards with the pairs along ``axis``; returns [...] ECEs (a
    0-d array for 1-d input), ``sum_b |sum_{i in b}(p_i - y_i)| / (2N)`` over both orientations.
    """
    g, b = np.moveaxis(np.asarray(r_good, dtype=np.float64), axis, -1), np.moveaxis(
        np.asarray(r_bad, dtype=np.float64), axis, -1)
    p_pos = _sigmoid(g - b)  # [..., N]
    p = np.concatenate([p_pos, 1.0 - p_pos], axis=-1)  # [..., 2N]
    residual = p - np.concatenate([np.ones_like(p_pos), np.zeros_like(p_pos)], axis=-1)
    idx = np.minimum((p * n_bins).astype(np.int64), n_bins - 1)
    rows = int(np.prod(p.shape[:-1], dtype=np.int64))
    # one bincount over (row, bin) cells: [rows, n_bins] sums of residuals
    cell = (np.arange(rows)[:, None] * n_bins + idx.reshape(rows, -1)).ravel()
    sums = np.bincount(cell, weights=residual.reshape(rows, -1).ravel(), minlength=rows * n_bins)
    return (np.abs(sums.reshape(rows, n_bins)).sum(axis=-1) / p.shape[-1]).reshape(p.shape[:-1])


def _accuracy(r_good: np.ndarray, r_bad: np.ndarray, axis: int = -1) -> np.ndarray:
    return np.mean(np.asarray(r_good) > np.asarray(r_bad), axis=axis)


def paired_bootstrap(statistic: Any, arrays: Sequence[ArrayLike], *, n_resamples: int = 2000,
                     confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """Percentile bootstrap interval of ``statistic(*arrays)`` with the items resampled together.

    ``arrays``: [N] arrays whose i-th entries belong to the same item (a test pair, a test prompt),
    e.g. two RMs' scores of the same pairs; every resample draws N item indices with replacement
    and applies them to every array, so what the arrays share (the item's difficulty) cancels in a
    difference. ``statistic(*arrays, axis=-1)`` must accept [..., N] arrays and reduce the last
    axis. ``scipy.stats.bootstrap(paired=True, method="percentile")``, seeded with ``seed``.

    Returns ``{"estimate": statistic on all items, "low", "high", "se": standard deviation of the
    resampled statistic, "n": N, "n_resamples", "confidence", "seed"}``.
    """
    from scipy import stats

    data = [_to_numpy(a) for a in arrays]
    if not data:
        raise ValueError("paired_bootstrap needs at least one array")
    n = data[0].size
    if any(a.size != n for a in data):
        raise ValueError(f"paired arrays differ in length: {[a.size for a in data]}")
    if n < 2:
        raise ValueError(f"paired_bootstrap needs at least 2 items, got {n}")
    if n_resamples < 1 or not 0 < confidence < 1:
        raise ValueError(f"n_resamples must be >= 1 and confidence in (0, 1), got {n_resamples}, {confidence}")
    estimate = float(statistic(*data, axis=-1))
    with np.errstate(all="ignore"):
        import warnings

        with warnings.catch_warnings():  # a degenerate distribution (every resample equal) is a valid answer here
            warnings.simplefilter("ignore")
            res = stats.bootstrap(data, statistic, n_resamples=n_resamples, vectorized=True, paired=True,
                                  confidence_level=confidence, method="percentile",
                                  rng=np.random.default_rng(seed))
    dist = np.asarray(res.bootstrap_distribution, dtype=np.float64)
    low, high = float(res.confidence_interval.low), float(res.confidence_interval.high)
    if not (math.isfinite(low) and math.isfinite(high)):  # scipy gives NaN when every resample is equal
        low = high = float(dist[0])
    return {"estimate": estimate, "low": low, "high": high, "se": float(dist.std(ddof=1)), "n": n,
            "n_resamples": n_resamples, "confidence": confidence, "seed": seed}


def rm_difference_interval(good_a: ArrayLike, bad_a: ArrayLike, good_b: ArrayLike, bad_b: ArrayLike, *,
                           metric: Literal["acc", "ece"], n_bins: int = 10, n_resamples: int = 2000,
                           confidence: float = 0.95, seed: int = 0) -> dict[str, float]:
    """RM A minus RM B in test accuracy (``metric="acc"``) or weighted ECE (``"ece"``), with a
    paired bootstrap interval over the test pairs both RMs scored (index i: the same pair).

    ``good_*``/``bad_*``: [N] rewards of the chosen / rejected responses. Positive: A higher.
    """
    for name, x in (("bad_a", bad_a), ("good_b", good_b), ("bad_b", bad_b)):
        _pairs(good_a, x)  # same length, non-empty; names the problem
    if metric == "acc":
        def stat(ga, ba, gb, bb, axis=-1):
            return _accuracy(ga, ba, axis) - _accuracy(gb, bb, axis)
    elif metric == "ece":
        def stat(ga, ba, gb, bb, axis=-1):
            return weighted_ece(ga, ba, n_bins, axis) - weighted_ece(gb, bb, n_bins, axis)
    else:
        raise ValueError(f"metric must be 'acc' or 'ece', got {metric!r}")
    return paired_bootstrap(stat, [good_a, bad_a, good_b, bad_b], n_resamples=n_resamples,
                            confidence=confidence, seed=seed)


def mean_difference_interval(x: ArrayLike, y: ArrayLike, *, n_resamples: int = 2000, confidence: float = 0.95,
                             seed: int = 0) -> dict[str, float]:
    """mean(x) - mean(y) for paired scores (index i: the same item, e.g. two policies' answers to
    the same test prompt under one evaluation RM), with a paired bootstrap interval."""
    _pairs(x, y)
    return paired_bootstrap(lambda a, b, axis=-1: np.mean(a - b, axis=axis), [x, y], n_resamples=n_resamples,
                            confidence=confidence, seed=seed)


def proportion_interval(k: int, n: int, confidence: float = 0.95) -> dict[str, float]:
    """k successes of n as a rate with its Wilson score interval (``scipy.stats.binomtest``);
    NaNs when n is 0."""
    if n == 0:
        return {"rate": float("nan"), "low": float("nan"), "high": float("nan"), "k": 0, "n": 0}
    if not 0 <= k <= n:
        raise ValueError(f"need 0 <= k <= n, got k={k}, n={n}")
    from scipy import stats

    ci = stats.binomtest(int(k), int(n)).proportion_ci(confidence_level=confidence, method="wilson")
    return {"rate": k / n, "low": float(ci.low), "high": float(ci.high), "k": int(k), "n": int(n)}


def samples_to_decide(effect: float, se: float, n: int, *, confidence: float = 0.95, power: float = 0.8) -> float:
    """Items needed for a two-sided test at ``confidence`` to find an effect of size ``effect`` with
    probability ``power``, when ``n`` items gave standard error ``se`` (assumed to shrink as
    1/sqrt(n)): ``n * ((z_{1-alpha/2} + z_power) * se / |effect|)^2``. ``inf`` for a zero effect."""
    if se < 0 or n < 1:
        raise ValueError(f"need se >= 0 and n >= 1, got se={se}, n={n}")
    if effect == 0:
        return float("inf")
    from scipy import stats

    z = stats.norm.ppf(1 - (1 - confidence) / 2) + stats.norm.ppf(power)
    return float(n * (z * se / abs(effect)) ** 2)
