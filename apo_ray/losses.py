"""Loss functions for APO (reward-model and policy side).

Pure functions: torch tensors in, scalar tensor out, no I/O. Every loss is also registered in
``LOSSES`` under a short name so that configs can pick one by string.

Notation: B = batch size, T = sequence length, V = vocabulary size.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = [
    "LOSSES",
    "apo_rm_loss",
    "bt_ranking_loss",
    "dpo_loss",
    "masked_lm_loss",
    "register_loss",
    "sequence_logprobs",
]

LOSSES: dict[str, Callable[..., Tensor]] = {}


def register_loss(name: str) -> Callable[[Callable[..., Tensor]], Callable[..., Tensor]]:
    """Decorator: register ``fn`` in ``LOSSES[name]`` and return it unchanged."""

    def deco(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        # A silent overwrite would make a config run a different loss than it names.
        if name in LOSSES and LOSSES[name] is not fn:
            raise KeyError(f"loss {name!r} is already registered")
        LOSSES[name] = fn
        return fn

    return deco


def _check_pair(a: Tensor, b: Tensor, names: str) -> None:
    if a.shape != b.shape:
        raise ValueError(f"{names}: shapes differ, {tuple(a.shape)} vs {tuple(b.shape)}")


@register_loss("bt")
def bt_ranking_loss(r_good: Tensor, r_bad: Tensor) -> Tensor:
    """Bradley-Terry ranking loss: ``mean(-log sigmoid(r_good - r_bad))``.

    Args:
        r_good: [B] rewards of the preferred responses.
        r_bad: [B] rewards of the dispreferred responses.
    Returns:
        scalar tensor.
    """
    _check_pair(r_good, r_bad, "bt_ranking_loss")
    # logsigmoid instead of log(sigmoid(.)): sigmoid underflows to 0 for large negative margins
    # and log(0) = -inf; logsigmoid stays finite (it is -softplus(-x)).
    return -F.logsigmoid(r_good - r_bad).mean()


@register_loss("apo_rm")
def apo_rm_loss(
    r_gold: Tensor,
    r_sample: Tensor,
    r_good: Tensor,
    r_bad: Tensor,
    *,
    beta2: float,
    apo_weight: float = 1.0,
) -> Tensor:
    """APO reward-model loss (paper eq. 15), with a weight on each term.

    ``apo_weight * bt(r_gold, r_sample) + beta2 * bt(r_good, r_bad)``

    Conventions:
      * paper: ``beta2=10, apo_weight=1``.
      * authors' code: preference weight 1 and 0.1/S on each of the S gold-vs-sample pairs of a
        query; since ``bt`` is a mean over pairs, that is ``beta2=1, apo_weight=0.1`` (the 1/S is
        the mean over a query's S pairs; with several queries per batch it is a mean over all pairs).

    Args:
        r_gold: [N_apo] rewards of golden answers (one per APO pair, repeated per sample).
        r_sample: [N_apo] rewards of policy samples paired with ``r_gold``.
        r_good: [N_pref] rewards of human-preferred responses.
        r_bad: [N_pref] rewards of human-dispreferred responses.
        beta2: weight of the human-preference term.
        apo_weight: weight of the APO (gold vs. sample) term.
    Returns:
        scalar tensor. A term whose pairs are empty contributes 0 (batches mix the two datasets,
        so either part may be missing); both empty raises ``ValueError``.
    """
    _check_pair(r_gold, r_sample, "apo_rm_loss (APO pairs)")
    _check_pair(r_good, r_bad, "apo_rm_loss (preference pairs)")
    has_apo = r_gold.numel() > 0
    has_pref = r_good.numel() > 0
    if not has_apo and not has_pref:
        raise ValueError("apo_rm_loss: both the APO pairs and the preference pairs are empty")
    # The mean of an empty tensor is NaN, so an empty part is replaced by an exact zero. Using
    # .sum() of the empty tensor (== 0) keeps dtype/device and stays in the autograd graph.
    apo_term = bt_ranking_loss(r_gold, r_sample) if has_apo else r_gold.sum()
    pref_term = bt_ranking_loss(r_good, r_bad) if has_pref else r_good.sum()
    return apo_weight * apo_term + beta2 * pref_term


def _shifted(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> tuple[Tensor, Tensor, Tensor]:
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


@register_loss("masked_lm")
def masked_lm_loss(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Next-token cross-entropy on response tokens only (the RJS policy update).

    ``logits[:, :-1]`` predict ``labels[:, 1:]``; only positions with ``loss_mask[:, 1:] == 1``
    count. The result is a token-level mean over the whole batch (long responses weigh more than
    short ones, as in standard SFT).

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids (the input ids).
        loss_mask: [B, T], 1 on response tokens, 0 on prompt/padding.
    Returns:
        scalar float32 tensor. Raises ``ValueError`` if the mask selects no token.
    """
    token_logps, mask = _shifted(logits, labels, loss_mask)
    n_tokens = mask.sum()
    if n_tokens.item() == 0:
        raise ValueError("masked_lm_loss: loss_mask selects no target tokens (after the shift)")
    return -(token_logps * mask).sum() / n_tokens


@register_loss("sequence_logprobs")
def sequence_logprobs(logits: Tensor, labels: Tensor, loss_mask: Tensor) -> Tensor:
    """Sum of log pi(y_t | x, y_<t) over the response tokens of each sequence.

    Same shift and masking as :func:`masked_lm_loss`. Not a loss itself, but registered so DPO
    pipelines can look it up by name alongside the losses.

    Args:
        logits: [B, T, V].
        labels: [B, T] token ids.
        loss_mask: [B, T], 1 on response tokens.
    Returns:
        [B] float32 log-probabilities of the responses.
    """
    token_logps, mask = _shifted(logits, labels, loss_mask)
    return (token_logps * mask).sum(dim=-1)


@register_loss("dpo")
def dpo_loss(
    policy_chosen_logps: Tensor,
    policy_rejected_logps: Tensor,
    ref_chosen_logps: Tensor,
    ref_rejected_logps: Tensor,
    *,
    beta: float,
) -> Tensor:
    """DPO loss: ``mean(-log sigmoid(beta * ((pc - rc) - (pr - rr))))``.

    Args:
        policy_chosen_logps: [B] sequence log-probs of chosen responses under the policy.
        policy_rejected_logps: [B] same for rejected responses.
        ref_chosen_logps: [B] chosen under the frozen reference model.
        ref_rejected_logps: [B] rejected under the reference model.
        beta: inverse temperature (strength of the implicit KL constraint).
    Returns:
        scalar tensor.
    """
    for t in (policy_rejected_logps, ref_chosen_logps, ref_rejected_logps):
        _check_pair(policy_chosen_logps, t, "dpo_loss")
    chosen_ratio = policy_chosen_logps - ref_chosen_logps
    rejected_ratio = policy_rejected_logps - ref_rejected_logps
    return -F.logsigmoid(beta * (chosen_ratio - rejected_ratio)).mean()
