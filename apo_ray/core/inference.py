"""Inference over seeds and test items together: pure functions, no I/O (the claims report's math).

The design: k runs that differ only in ``run.seed`` score the same N test items (``data.seed``
fixes the blocks), so seeds and items are *crossed*. For one comparison A - B, let d_j be seed j's
estimate on all N items. Under the crossed random-effects model

    d_{j,i} = delta + s_j + t_i + (st)_{ji},   Var s = sigma2_seed, Var t = sigma2_item, Var (st) = sigma2_int

the mean over seeds of the per-seed estimates has

    Var(mean) = sigma2_seed / k + sigma2_item / N + sigma2_int / (k N).

Three observable variances identify the components without counting the interaction twice (the
old pooled interval, ``se_items^2 + sd_seeds^2 / k``, did):

- ``s2_seeds``, the sample variance of the k per-seed estimates (the items are the same in every
  seed, so the item effect cancels): sigma2_seed + sigma2_int / N;
- ``v_within``, the mean over seeds of each seed's item-bootstrap variance: (sigma2_item + sigma2_int) / N;
- ``v_pooled``, the item-bootstrap variance of the mean over seeds (the same item indices drawn in
  every seed): (sigma2_item + sigma2_int / k) / N.

So sigma2_int / N = k (v_within - v_pooled) / (k - 1), sigma2_item / N = v_within - sigma2_int / N,
and Var(mean) = s2_seeds / k + sigma2_item / N. The two terms have k - 1 and N - 1 degrees of
freedom; the interval uses Student's t with the Welch-Satterthwaite degrees of freedom of their
sum, which tend to k - 1 where the seed term dominates (with k = 3 seeds: t_2 = 4.30, not 1.96).
The bootstrap variances work for any statistic (accuracy, ECE, mean score), not only for means.

Multiplicity: Holm's step-down adjustment across the claims of one report (it controls the chance
of *any* wrong verdict among them under every dependence between claims; several claims share a
model, e.g. RM_APO-v1, so their tests are dependent in unknown ways, which Benjamini-Hochberg's FDR
guarantee does not cover, and a referee reads each verdict on its own, which is what a familywise
bound protects). One rule for both verdicts: a claim is decided when its Holm-adjusted p < alpha,
"held" when the estimate has the paper's sign, "not held" when it has the other.

Power: for an effect delta with the components above, the test's power at k seeds and N items is
that of a two-sided t test with noncentrality delta / SE(k, N); :func:`seeds_needed` is the
smallest k reaching the target power (infinite when the item terms alone keep it below).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

__all__ = [
    "Components",
    "crossed_components",
    "crossed_interval",
    "holm",
    "items_needed",
    "power",
    "seeds_needed",
    "verdict",
]


@dataclass(frozen=True)
class Components:
    """Variance components of one comparison, per item where it says so.

    ``var_seed``: sigma2_seed; ``var_item`` / ``var_int``: sigma2_item and sigma2_int *per item*
    (so an N-item mean carries var_item / N); ``k``/``n``: the seeds and items they came from.
    """

    var_seed: float
    var_item: float
    var_int: float
    k: int
    n: int

    def se(self, k: int | None = None, n: int | None = None) -> float:
        """Standard error of the mean over ``k`` seeds of ``n``-item estimates (default: observed)."""
        k, n = k or self.k, n or self.n
        return math.sqrt(max(self.var_seed / k + self.var_item / n + self.var_int / (k * n), 0.0))

    def df(self, k: int | None = None, n: int | None = None) -> float:
        """Welch-Satterthwaite degrees of freedom of the seed term (k - 1 df) plus the item term (n - 1 df)."""
        k, n = k or self.k, n or self.n
        seed_term = self.var_seed / k + self.var_int / (k * n)  # what the spread of k seed estimates carries
        item_term = self.var_item / n
        if k < 2:
            return float(max(n - 1, 1))
        denominator = seed_term ** 2 / (k - 1) + item_term ** 2 / max(n - 1, 1)
        if denominator == 0:
            return float(k - 1)
        return float((seed_term + item_term) ** 2 / denominator)


def crossed_components(per_seed: Sequence[float], per_seed_item_var: Sequence[float], pooled_item_var: float,
                       n_items: int) -> Components:
    """The crossed model's components from ``per_seed`` estimates (k of them), each seed's
    item-bootstrap variance and the item-bootstrap variance of their mean (the module docstring's
    s2_seeds, v_within, v_pooled). Negative moment estimates are set to 0 (a component that the data
    cannot tell from 0). With one seed the seed component is unknown: NaN."""
    k = len(per_seed)
    if k < 1 or len(per_seed_item_var) != k:
        raise ValueError(f"need one item variance per seed estimate, got {k} estimates and "
                         f"{len(per_seed_item_var)} variances")
    if n_items < 2:
        raise ValueError(f"need at least 2 test items, got {n_items}")
    v_within = sum(per_seed_item_var) / k
    if k == 1:
        return Components(float("nan"), v_within * n_items, 0.0, 1, n_items)
    mean = sum(per_seed) / k
    s2_seeds = sum((d - mean) ** 2 for d in per_seed) / (k - 1)
    int_over_n = max(k * (v_within - pooled_item_var) / (k - 1), 0.0)
    item_over_n = max(v_within - int_over_n, 0.0)
    seed = max(s2_seeds - int_over_n, 0.0)
    return Components(seed, item_over_n * n_items, int_over_n * n_items, k, n_items)


def crossed_interval(per_seed: Sequence[float], per_seed_item_var: Sequence[float], pooled_item_var: float,
                     n_items: int, *, confidence: float = 0.95) -> dict:
    """Mean over seeds with its crossed-model standard error, t critical value, interval and
    two-sided p-value for "no difference". With one seed: NaNs (seed noise is not measured)."""
    from scipy import stats

    comp = crossed_components(per_seed, per_seed_item_var, pooled_item_var, n_items)
    k = comp.k
    estimate = float(sum(per_seed) / k)
    out = {"estimate": estimate, "k": k, "n": n_items, "components": asdict(comp)}
    if k < 2:
        return out | {"se": float("nan"), "df": float("nan"), "t_crit": float("nan"), "low": float("nan"),
                      "high": float("nan"), "p": float("nan")}
    se, df = comp.se(), comp.df()
    t_crit = float(stats.t.ppf(1 - (1 - confidence) / 2, df))
    p = float(2 * stats.t.sf(abs(estimate) / se, df)) if se > 0 else (0.0 if estimate != 0 else 1.0)
    return out | {"se": se, "df": df, "t_crit": t_crit, "low": estimate - t_crit * se,
                  "high": estimate + t_crit * se, "p": p}


def holm(p_values: Sequence[float]) -> list[float]:
    """Holm's step-down adjusted p-values (NaN stays NaN and does not count as a test): sort the m
    p-values ascending, multiply the i-th (from 0) by m - i, take running maxima, cap at 1."""
    idx = [i for i, p in enumerate(p_values) if p is not None and not math.isnan(p)]
    m = len(idx)
    out = [float("nan")] * len(p_values)
    running = 0.0
    for rank, i in enumerate(sorted(idx, key=lambda j: p_values[j])):
        running = max(running, min(1.0, (m - rank) * p_values[i]))
        out[i] = running
    return out


def verdict(estimate: float, adjusted_p: float, sign: int, *, alpha: float = 0.05) -> str:
    """One rule for both answers: decided when the adjusted p < alpha; then "held" if the estimate
    has the paper's ``sign``, else "not held"; otherwise (or without a p-value) "undecided"."""
    if adjusted_p is None or math.isnan(adjusted_p) or adjusted_p >= alpha:
        return "undecided"
    return "held" if estimate * sign > 0 else "not held"


def power(effect: float, comp: Components, k: int, n: int, *, alpha: float = 0.05) -> float:
    """Power of the two-sided t test at level ``alpha`` to find ``effect`` with k seeds and n items
    (noncentral t with the Satterthwaite df of :meth:`Components.df`)."""
    from scipy import stats

    if k < 2:
        return float("nan")
    se, df = comp.se(k, n), comp.df(k, n)
    if se == 0:
        return 1.0 if effect != 0 else alpha
    t_crit = stats.t.ppf(1 - alpha / 2, df)
    nc = abs(effect) / se
    value = float(stats.nct.sf(t_crit, df, nc) + stats.nct.cdf(-t_crit, df, nc))
    if not math.isfinite(value):  # scipy's noncentral t gives NaN far in its tail: the normal limit
        value = float(stats.norm.sf(t_crit - nc) + stats.norm.cdf(-t_crit - nc))
    return value


def seeds_needed(effect: float, comp: Components, n: int, *, alpha: float = 0.05, target: float = 0.8,
                 max_seeds: int = 1000) -> float:
    """The fewest seeds (>= 2) for ``target`` power at ``n`` items; inf when even ``max_seeds``
    do not reach it (then the item terms need more items)."""
    if effect == 0 or any(math.isnan(x) for x in (comp.var_seed, comp.var_item, comp.var_int)):
        return float("inf") if effect == 0 else float("nan")
    return _fewest(lambda k: power(effect, comp, k, n, alpha=alpha) >= target, max_seeds)


def items_needed(effect: float, comp: Components, k: int, *, alpha: float = 0.05, target: float = 0.8,
                 max_items: int = 10_000_000) -> float:
    """The fewest test items for ``target`` power with ``k`` seeds; inf when the seed term alone
    keeps the power below it."""
    if effect == 0 or any(math.isnan(x) for x in (comp.var_seed, comp.var_item, comp.var_int)):
        return float("inf") if effect == 0 else float("nan")
    return _fewest(lambda n: power(effect, comp, k, n, alpha=alpha) >= target, max_items)


def _fewest(enough, most: int) -> float:
    """The smallest count in [2, most] for which ``enough(count)`` holds (power grows with the count:
    a binary search); inf when even ``most`` is not enough."""
    lo, hi = 2, most
    if not enough(hi):
        return float("inf")
    while lo < hi:
        mid = (lo + hi) // 2
        if enough(mid):
            hi = mid
        else:
            lo = mid + 1
    return float(lo)
