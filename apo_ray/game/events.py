"""What the game tells its observers: typed events, one per finished phase, arm-round and round.

The game (``loop.APOGame``) emits them through its ``on_event`` callback and knows nothing of who
listens; ``runtime/play.py`` hands them to the outputs (progress lines, trackers, export) and, on
Ray, to the dashboard metrics. Each event carries what its observers need, so none of them reads
back from disk what the game had in memory.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypedDict


class RoundRecord(TypedDict, total=False):
    """One (round, arm) result: a row of ``summary.json`` (the report, claims and sweep reports
    read these keys). RM metrics are fractions; ``rm_<split>_bins`` are reliability bins."""

    round: int
    rm_mode: str  # the arm
    rm: str  # the RM version's id, e.g. "rm/apo/r1"
    policy: str  # the policy version's id, e.g. "policy/apo/r1"
    eval_rm: str  # the evaluation RM that scored policy_mean_reward
    eval_rm_is_rm_base: bool
    gold_source: str
    gold_counts: dict
    rm_dev_acc: float
    rm_dev_ece: float
    rm_dev_ace: float
    rm_dev_mce: float
    rm_dev_bins: list
    rm_test_acc: float
    rm_test_ece: float
    rm_test_ace: float
    rm_test_mce: float
    rm_test_bins: list
    policy_mean_reward: float
    policy_reward_stderr: float
    policy_rewards: dict  # evaluation RM id -> {"mean", "stderr"}
    test_queries: int
    phase_seconds: dict  # phase name -> wall seconds in this (round, arm)
    apo_pairs: int
    best_of_s_mean_score: float
    empty_samples: int
    queries_skipped: int
    rm_train: dict  # the RM learner's stats (no per-step lists)
    policy_train: dict
    resources_after_round: dict
    rm_apo_acc_before: float  # APO arms: share of D_APO pairs the round's starting RM ranks gold first
    rm_apo_acc_after: float  # ... and the RM the round trained
    eval_rm_test_acc: float  # the primary evaluation RM's test accuracy and ECE (shared by every seed)
    eval_rm_test_ece: float
    eval_rm_quality: dict  # evaluation RM id -> {"acc", "ece", "n"} on the test pairs


@dataclass(frozen=True)
class PhaseFinished:
    """A phase was computed (a phase read back from the checkpoint sends no event).

    ``items``: what the phase counted (sequences sampled or scored); ``generation``: the generator
    pool's stats of a sampling phase (sequences, new_tokens, seconds, samples_per_s, tokens_per_s,
    sync_seconds, sync_bytes); ``train``: a learner phase's stats (examples or pairs, per-step
    ``losses`` and ``lrs``, tokens_per_s)."""

    phase: str  # sample_gold | train_rm | train_rm_base | train_eval_rm | sample_queries | ...
    key: str  # the phase store key of its result
    seconds: float
    round: int | None = None  # None: the setup before round 1
    arm: str | None = None
    items: int | None = None
    generation: dict[str, float] | None = None
    train: dict[str, Any] | None = None


@dataclass(frozen=True)
class ArmRoundFinished:
    """An arm finished round ``round`` (round 0: the starting point, evaluated once set up).
    ``test_prompts`` / ``test_answers`` / ``test_scores``: the policy's test answers and their
    evaluation-RM scores, in prompt order."""

    round: int
    arm: str
    record: RoundRecord
    test_prompts: list[str] = field(default_factory=list)
    test_answers: list[str] = field(default_factory=list)
    test_scores: list[float] = field(default_factory=list)


@dataclass(frozen=True)
class RoundFinished:
    """Every arm finished round ``round``: what the system holds now (on Ray, the object store)."""

    round: int
    live_versions: tuple[str, ...]
    usage: dict[str, float]


GameEvent = PhaseFinished | ArmRoundFinished | RoundFinished
