"""The RM update modes the paper compares ("arms"), as one table of data.

Each :class:`Arm` says what its RM starts from each round, whether it trains, on what
data, whether the policy must answer the golden queries for it, and how reports name and colour
it. ``game.play_round``, the report and the judge read this table; adding a mode is one entry
here plus its test.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

__all__ = ["ARM_TABLE", "Arm", "get_arm", "judge_baseline"]


@dataclass(frozen=True)
class Arm:
    name: str  # the config value (apo.arms / apo.rm_mode)
    label: str  # the arm in reports
    rm_name: str  # its round-r RM in reports; "{r}" is replaced by the round
    colour: str  # matplotlib colour of the arm in figures
    # What the round's RM starts from: "base" (RM_Base, every round), "previous" (this arm's RM of
    # the previous round; RM_Base in round 1), or None (the RM is not trained: RM_Base throughout).
    rm_init: str | None
    trains_on_apo_pairs: bool  # D_APO (gold vs the policy's samples) joins D_P in its RM's data
    # Another mode whose round-1 RM and policy this one's equal (same start, data and settings):
    # they are computed once, under that mode's name.
    round1_as: str | None = None
    judge_baseline: bool = False  # the policy every other arm's is judged against
    # Trains on APO's step schedule with the APO pairs left out (the ablation): the same number of
    # optimiser steps, each with the same D_P pairs as APO's (``training.RMLoss.skip_apo_pairs``).
    apo_step_matched: bool = False
    description: str = ""

    @property
    def trains_rm(self) -> bool:
        return self.rm_init is not None

    def lineage(self, round_no: int) -> str:
        """The name its round-``round_no`` phases are stored under."""
        return self.round1_as if round_no == 1 and self.round1_as else self.name

    def rm_display_name(self, round_no: int) -> str:
        return "RM_Base" if not self.trains_rm or round_no == 0 else self.rm_name.format(r=round_no)


ARM_TABLE: dict[str, Arm] = {m.name: m for m in (
    Arm("fixed", "RJS (RM_Base fixed)", "RM_Base", "tab:gray", rm_init=None, trains_on_apo_pairs=False,
                 judge_baseline=True, description="the RJS baseline: RM_Base stays fixed for all rounds"),
    Arm("apo", "APO (vR)", "RM_APO-v{r}", "tab:blue", rm_init="base", trains_on_apo_pairs=True,
                 description="RM_APO-vR: each round fine-tunes RM_Base on D_P + that round's D_APO"),
    Arm("apo_seq", "APO (vR-seq)", "RM_APO-v{r}seq", "tab:orange", rm_init="previous",
                 trains_on_apo_pairs=True, round1_as="apo",
                 description="RM_APO-vR-seq: each round continues from the previous round's APO RM"),
    Arm("ablation", "RM_Base-AB", "RM_Base-AB(v{r})", "tab:green", rm_init="base",
                 trains_on_apo_pairs=False, apo_step_matched=True,
                 description="RM_Base-AB: RM_APO-v1's fine-tuning without any D_APO, step for step"),
)}


def get_arm(name: str) -> Arm:
    if name not in ARM_TABLE:
        raise ValueError(f"unknown rm mode {name!r}; choose from {tuple(ARM_TABLE)}")
    return ARM_TABLE[name]


def judge_baseline() -> Arm:
    return next(m for m in ARM_TABLE.values() if m.judge_baseline)


def scored_by_rm_base_warning(arms: Sequence[str]) -> str:
    """What a run says (log and report.md) when no evaluation RM is on and RM_Base scores the policies."""
    return ("WARNING: no evaluation RM is on (eval.rm_test, eval.rm_all_paths, eval.eval_rm), so RM_Base "
            "scores the policies' test answers. RM_Base is the RM the fixed arm (RJS) trains against and the "
            f"start of every other arm's RM (arms: {', '.join(arms)}): these scores measure how well a policy "
            "games that RM, not how good it is. Turn on an evaluation RM that no arm optimises "
            "(experiment=paper_hh turns on RM_Test).")
