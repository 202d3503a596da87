"""Policy objectives: how a round turns the policy's S scored samples of a query into a training
example, and the loss the policy learner minimises on those examples.

One registry (``POLICY_OBJECTIVES``), filled by :func:`register_objective`; ``policy.objective`` in
the config names an entry, and :func:`policy_objective` refuses an unknown name with the list of
valid ones. Adding an objective is one class here plus its test; the game and the learner ask it
questions (``responses_per_example``, ``uses_reference``) instead of comparing names.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

from torch import Tensor

from apo_ray.core.losses import dpo_loss, masked_lm_loss, sequence_logprobs

POLICY_OBJECTIVES: dict[str, type[PolicyObjective]] = {}


def register_objective(cls: type[PolicyObjective]) -> type[PolicyObjective]:
    if cls.name in POLICY_OBJECTIVES and POLICY_OBJECTIVES[cls.name] is not cls:
        raise KeyError(f"policy objective {cls.name!r} is already registered")
    POLICY_OBJECTIVES[cls.name] = cls
    return cls


def policy_objective(name: str, **settings) -> PolicyObjective:
    """The registered objective ``name``, built from the ``settings`` it declares in ``options``
    (e.g. ``dpo_beta``; the others are not its business)."""
    if name not in POLICY_OBJECTIVES:
        raise ValueError(f"policy.objective must be one of {sorted(POLICY_OBJECTIVES)}, got {name!r}")
    cls = POLICY_OBJECTIVES[name]
    return cls(**{k: v for k, v in settings.items() if k in cls.options})


def _non_empty(samples: Sequence[str], scores: Sequence[float]) -> list[tuple[float, str]]:
    # The authors drop empty responses before ranking; an empty answer must never be the one
    # the policy is taught to give.
    return [(score, s) for s, score in zip(samples, scores) if s.strip()]


class PolicyObjective:
    """Base of the registry entries. Subclasses set the class attributes and both methods."""

    name: ClassVar[str]
    responses_per_example: ClassVar[int]  # responses of one example after its prompt
    uses_reference: ClassVar[bool] = False  # needs the round's starting policy's log-probs
    count_unit: ClassVar[str]  # what the loss averages over in a step: "tokens" or "pairs"
    options: ClassVar[tuple[str, ...]] = ()  # the settings its constructor takes

    def select(self, samples: Sequence[str], scores: Sequence[float]) -> tuple[str, ...] | None:
        """The responses one query contributes (``responses_per_example`` of them), or None to skip it."""
        raise NotImplementedError

    def loss(self, logits: Tensor, input_ids: Tensor, loss_mask: Tensor, *, n_step: int,
             reference_logps: Tensor | None = None) -> Tensor:
        """This micro-batch's share of the step's loss.

        logits: [k * R, T, V] for k examples of R = ``responses_per_example`` responses, all first
        responses first; input_ids, loss_mask: [k * R, T]; reference_logps: [k * R] (when
        ``uses_reference``); n_step: the step's count of ``count_unit``.
        """
        raise NotImplementedError


@register_objective
class RejectionSampling(PolicyObjective):
    """The paper's RJS: fine-tune on the best of S under the RM, LM loss on its response tokens."""

    name = "rjs"
    responses_per_example = 1
    count_unit = "tokens"

    def select(self, samples, scores):
        candidates = _non_empty(samples, scores)
        return (max(candidates, key=lambda c: c[0])[1],) if candidates else None

    def loss(self, logits, input_ids, loss_mask, *, n_step, reference_logps=None):
        return masked_lm_loss(logits, input_ids, loss_mask, n_tokens=n_step)


@register_objective
class DirectPreference(PolicyObjective):
    """DPO on the best vs the worst of S under the RM; the reference is the round's starting policy."""

    name = "dpo"
    responses_per_example = 2
    uses_reference = True
    count_unit = "pairs"
    options = ("dpo_beta",)

    def __init__(self, dpo_beta: float = 0.1):
        self.beta = dpo_beta

    def select(self, samples, scores):
        candidates = _non_empty(samples, scores)
        if not candidates:
            return None
        best, worst = max(candidates, key=lambda c: c[0])[1], min(candidates, key=lambda c: c[0])[1]
        return (best, worst) if best != worst else None  # equal texts carry no preference

    def loss(self, logits, input_ids, loss_mask, *, n_step, reference_logps=None):
        logps = sequence_logprobs(logits, input_ids, loss_mask)  # [2k]
        k = logps.shape[0] // 2
        ref = reference_logps.to(logps.device)
        return dpo_loss(logps[:k], logps[k:], ref[:k], ref[k:], beta=self.beta, n_pairs=n_step)
