"""Loss functions for APO (reward-model and policy side): the one definition the learners train with.

Pure functions: torch tensors in, scalar tensor out, no I/O.

Every loss is a mean over items (pairs or tokens). A learner that accumulates gradients over
micro-batches (and ranks) passes the item counts of the whole optimiser step (``n_pairs``,
``n_tokens`` ...): each call then returns its micro-batch's *share* of the step's mean, and the
shares add up to exactly that mean, whatever the micro-batch size. Without the counts a call is
the plain mean over what it is given.

Notation: B = batch size, T = sequence length, V = vocabulary size.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "RM_LOSS_REDUCTIONS",
    "apo_rm_loss",
    "bt_ranking_loss",
    "dpo_loss",
    "masked_lm_loss",
    "sequence_logprobs",
]

# How apo_rm_loss combines its two terms (see there).
RM_LOSS_REDUCTIONS = ("per_term", "pooled")


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


def _share(total: Tensor, n_items: int | None, default: int, what: str) -> Tensor:
    """``total / n_items`` (the step's count) or ``total / default`` (this call's own count)."""
    n = default if n_items is None else n_items
    if n <= 0:
        raise ValueError(f"{what}: the item count to average over must be >= 1, got {n}")
    return total / n


def bt_ranking_loss(r_good: Tensor, r_bad: Tensor, *, n_pairs: int | None = None) -> Tensor:
    """Bradley-Terry ranking loss: ``sum(-log sigmoid(r_good - r_bad)) / n_pairs``.

    Args:
        r_good: [B] rewards of the preferred responses.
        r_bad: [B] rewards of the dispreferred responses.
        n_pairs: pairs of the whole optimiser step (default B: the plain mean).
    Returns:
        scalar tensor.
    """
    _check_pair(r_good, r_bad, "bt_ranking_loss")
    # logsigmoid instead of log(sigmoid(.)): sigmoid underflows to 0 for large negative margins
    # and log(0) = -inf; logsigmoid stays finite (it is -softplus(-x)).
    return _share(-F.logsigmoid(r_good - r_bad).sum(), n_pairs, r_good.numel(), "bt_ranking_loss")


def apo_rm_loss(
    r_gold: Tensor,
    r_sample: Tensor,
    r_good: Tensor,
    r_bad: Tensor,
    *,
    beta2: float,
    apo_weight: float = 1.0,
    reduction: str = "per_term",
    samples_per_query: int = 1,
    n_apo: int | None = None,
    n_pref: int | None = None,
) -> Tensor:
    """APO reward-model loss over APO pairs (gold vs policy sample) and preference pairs (D_P).

    With l = -log sigmoid(r_better - r_worse) per pair:

    * ``reduction="per_term"`` (the paper's eq. 15): ``apo_weight * mean_APO(l) + beta2 * mean_P(l)``.
      The paper: ``beta2=10, apo_weight=1``.
    * ``reduction="pooled"`` (the authors' code): one mean over all pairs, an APO pair weighted
      ``apo_weight / samples_per_query`` and a preference pair ``beta2``:
      ``(apo_weight / S * sum_APO(l) + beta2 * sum_P(l)) / (N_APO + N_P)``.
      The authors' code: ``beta2=1`` (their ``rm_kl_coeff``), ``apo_weight=0.1`` (their
      ``apo_loss_coeff``), ``samples_per_query=S`` (their ``apo_sample_num``).

    The two agree only when the step's pairs are balanced just so; per_term keeps the APO term's
    weight independent of how many golden queries a step happens to hold.

    Args:
        r_gold: [N_apo] rewards of golden answers (one per APO pair, repeated per sample).
        r_sample: [N_apo] rewards of policy samples paired with ``r_gold``.
        r_good: [N_pref] rewards of human-preferred responses.
        r_bad: [N_pref] rewards of human-dispreferred responses.
        beta2: weight of the preference term.
        apo_weight: weight of the APO term.
        reduction: "per_term" or "pooled".
        samples_per_query: S, used by "pooled".
        n_apo, n_pref: APO / preference pairs of the whole optimiser step (default: this call's).
    Returns:
        scalar tensor. A term without pairs in the step contributes 0; a call with no pairs at
        all raises ``ValueError``.
    """
    _check_pair(r_gold, r_sample, "apo_rm_loss (APO pairs)")
    _check_pair(r_good, r_bad, "apo_rm_loss (preference pairs)")
    if reduction not in RM_LOSS_REDUCTIONS:
        raise ValueError(f"apo_rm_loss: reduction must be one of {RM_LOSS_REDUCTIONS}, got {reduction!r}")
    if r_gold.numel() == 0 and r_good.numel() == 0:
        raise ValueError("apo_rm_loss: both the APO pairs and the preference pairs are empty")
    n_apo = r_gold.numel() if n_apo is None else n_apo
    n_pref = r_good.numel() if n_pref is None else n_pref
    # Sums, not means: an empty part sums to an exact 0 that keeps dtype, device and the graph
    # (the mean of an empty tensor would be NaN).
    apo_sum = -F.logsigmoid(r_gold - r_sample).sum()
    pref_sum = -F.logsigmoid(r_good - r_bad).sum()
    if reduction == "pooled":
        weighted = apo_weight / samples_per_query * apo_sum + beta2 * pref_sum
        return _share(weighted, n_apo + n_pref, 0, "apo_rm_loss")
    apo_term = apo_sum / n_apo if n_apo else apo_sum
    pref_term = pref_sum / n_pref if n_pref else pref_sum
    return apo_weight * apo_term + beta2 * pref_term


def _shifted(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor]:
    """Causal-LM shift: position t predicts token t+1.

    Returns per-token log-probs of the target tokens [B, T-1] (float32), and the shifted mask
    [B, T-1] as float32.
    """
    if logits.dim() != 3:
        raise ValueError(f"logits must be [B, T, V], got shape {tuple(logits.shape)}")
    if labels.shape != logits.shape[:2] or loss_mask.shape != logits.shape[:2]:
        raise ValueError(
            f"labels {tuple(labels.shape)} and loss_mask {tuple(loss_mask.shape)} must be "
            f"{tuple(logits.shape[:2])}"
        )
    logits = logits[:, :-1, :]
    targets = labels[:, 1:]
    mask = loss_mask[:, 1:].to(torch.float32)
    # Masked positions may hold an ignore index such as -100, which gather() cannot index with;
    # their value is irrelevant because the mask zeroes them afterwards.
    targets = torch.where(mask.bool(), targets, torch.zeros_like(targets))
    # float32 log_softmax: in bf16/fp16 the log-sum-exp over a large vocabulary loses precision.
    logps = torch.log_softmax(logits.float(), dim=-1)
    token_logps = logps.gather(-1, targets.long().unsqueeze(-1)).squeeze(-1)
    return token_logps, mask


def masked_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor, *, n_tokens: int | None = None) -> Tensor:
    """Next-token cross-entropy on response tokens only (the RJS policy update).

    ``logits[:, :-1]`` predict ``labels[:, 1:]``; only positions with ``loss_mask[:, 1:] == 1``
    count. A token-level mean (long responses weigh more than short ones, as in standard SFT).

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids (the input ids).
        loss_mask: [B, T], 1 on response tokens, 0 on prompt/padding.
        n_tokens: target tokens of the whole optimiser step (default: those selected here).
    Returns:
        scalar float32 tensor. Raises ``ValueError`` if there is no token to average over.
    """
    token_logps, mask = _shifted(logits, labels, loss_mask)
    selected = int(mask.sum().item()) if n_tokens is None else n_tokens
    if selected == 0:
        raise ValueError("masked_lm_loss: loss_mask selects no target tokens (after the shift)")
    return _share(-(token_logps * mask).sum(), n_tokens, selected, "masked_lm_loss")


def sequence_logprobs(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of log pi(y_t | x, y_<t) over the response tokens of each sequence.

    Same shift and masking as :func:`masked_lm_loss`; DPO's log-ratios are built from it.

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids.
        loss_mask: [B, T], 1 on response tokens.
    Returns:
        [B] float32 log-probabilities of the responses.
    """
    token_logps, mask = _shifted(logits, labels, loss_mask)
    return (token_logps * mask).sum(dim=-1)


def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
    n_pairs: int | None = None,
) -> Tensor:
    """DPO loss: ``sum(-log sigmoid(beta * ((pc - rc) - (pr - rr)))) / n_pairs``.

    Args:
        policy_chosen_logps: [B] sequence log-probs of chosen responses under the policy.
        policy_rejected_logps: [B] same for rejected responses.
        ref_chosen_logps: [B] chosen under the frozen reference model.
        ref_rejected_logps: [B] rejected under the reference model.
        beta: inverse temperature (strength of the implicit KL constraint).
        n_pairs: pairs of the whole optimiser step (default B: the plain mean).
    Returns:
        scalar tensor.
    """
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        _check_pair(policy_chosen_logps, t, "dpo_loss")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    losses = -F.logsigmoid(beta * (chosen_ratio - rejected_ratio))
    return _share(losses.sum(), n_pairs, losses.numel(), "dpo_loss")
