"""The game's data, built once per run: D_P, the golden queries with their golden answers, the LLM
queries D_Q, the dev/test blocks and the evaluation RMs' pairs (from :mod:`apo_ray.data`'s splits)."""

from __future__ import annotations

import logging
from collections import Counter
from dataclasses import dataclass, field

from apo_ray.config import Config
from apo_ray.data import (
    GoldenAnswer,
    PreferencePair,
    golden_by_key,
    golden_query_pairs,
    load_apo_splits,
    load_golden_answers,
    load_preference_pairs,
    query_key,
)

log = logging.getLogger(__name__)


@dataclass
class GameData:
    gold: list[GoldenAnswer]  # golden queries with their golden answers
    pref_pairs: list[PreferencePair]  # D_P
    llm_queries: list[str]  # D_Q
    dev_pairs: list[PreferencePair]
    test_pairs: list[PreferencePair]
    eval_rm_pairs: list[PreferencePair] = field(default_factory=list)  # the held-out evaluation RM's block
    gold_source: str = "chosen-fallback"  # what the golden answers are, with counts
    gold_counts: dict = field(default_factory=dict)
    train_pairs: list[PreferencePair] = field(default_factory=list)  # RM_Test's data: all but the test block
    rm_all_extra_pairs: list[PreferencePair] = field(default_factory=list)  # RM_All's further sets


def join_golden_answers(queries: list[PreferencePair], golden_path: str | None) -> tuple[list[GoldenAnswer], str, dict]:
    """Golden answers for the golden queries, from the file where it has one, else the chosen
    response. Returns (answers, a one-line description, counts)."""
    if not golden_path:
        gold = [GoldenAnswer(p.prompt, p.chosen, "chosen-fallback") for p in queries]
        return gold, f"chosen-fallback: {len(gold)} chosen responses", {"fell_back_to_chosen": len(gold)}
    answers = golden_by_key(load_golden_answers(golden_path))
    gold, file_sources, fell_back = [], Counter(), 0
    for p in queries:
        answer = answers.get(query_key(p.prompt))
        if answer is None:
            fell_back += 1
            answer = GoldenAnswer(p.prompt, p.chosen, "chosen-fallback")
        else:
            file_sources[answer.source] += 1
        gold.append(answer)
    used = len(queries) - fell_back
    counts = {"from_file": used, "fell_back_to_chosen": fell_back, "file_sources": dict(file_sources),
              "file_answers_not_used": len(answers) - used}
    by_source = ", ".join(f"{k}={v}" for k, v in sorted(file_sources.items()))
    source = (f"file: {used} answers, {fell_back} fell back to chosen ({golden_path}"
              + (f"; the file's sources: {by_source}" if by_source else "") + ")")
    if fell_back or counts["file_answers_not_used"]:
        log.warning("golden answers: %d of %d golden queries have no answer in %s (they use the chosen response) "
                    "and %d answers in it are for other queries: was it collected for another data split? "
                    "jobs/golden.py with this run's experiment and data overrides collects exactly these queries",
                    fell_back, len(queries), golden_path, counts["file_answers_not_used"])
    return gold, source, counts


def build_game_data(cfg: Config) -> GameData:
    """Load, clean and split the preference data; join golden answers to the golden queries."""
    d = cfg.data
    splits = load_apo_splits(d)
    gold, source, counts = join_golden_answers(golden_query_pairs(splits, d.gold_queries), d.golden_path)
    extra = load_preference_pairs(cfg.eval.rm_all_paths, clean=d.clean) if cfg.eval.rm_all_paths else []
    log.info("data: %d D_P pairs, %d golden queries (%s), %d LLM queries, %d dev, %d test (%s), %d held-out "
             "eval-RM pairs, %d training pairs", len(splits.rm_pairs), len(gold), source, len(splits.llm_queries),
             len(splits.dev_pairs), len(splits.test_pairs),
             "from data.test_path" if splits.test_from == "test_path" else "cut from data.path",
             len(splits.eval_rm_pairs), len(splits.train_pairs))
    return GameData(gold=gold, pref_pairs=list(splits.rm_pairs), llm_queries=list(splits.llm_queries),
                    dev_pairs=list(splits.dev_pairs), test_pairs=list(splits.test_pairs),
                    eval_rm_pairs=list(splits.eval_rm_pairs), gold_source=source, gold_counts=counts,
                    train_pairs=list(splits.train_pairs), rm_all_extra_pairs=list(extra))


def eval_prompts(cfg: Config, data: GameData) -> list[str]:
    """The test prompts every policy answers (and the judge compares), in a fixed order."""
    return list(dict.fromkeys(p.prompt for p in data.test_pairs))[: cfg.eval.test_queries]
