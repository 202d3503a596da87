"""Algorithm 1 of the APO paper (RM-LLM game with rejection sampling), written once.

The loop is written against :class:`GameSystem`, so the same code runs in one process
(:class:`apo_ray.local.LocalSystem`) and on Ray actors (:class:`apo_ray.ray_system.RaySystem`).
Each round of each arm (an RM update mode) does, as in the paper:

1. sample S responses from the current policy for every golden query;
2. D_APO = {(x, y_gold, y_sample)};
3. update the RM with L_APO-RM = apo_weight * L_rank(D_APO) + beta2 * L_rank(D_P);
4. sample S responses for every LLM training query;
5. keep the best of S under the RM;
6. fine-tune the policy on (x, y_best) (LM loss on response tokens; or DPO on best vs worst);
then evaluates the RM (dev/test accuracy, ECE) and the policy (evaluation-RM score of its test answers).

How it departs from the paper / design choices:
- Before round 1, RM_Base is trained on D_P (plain Bradley-Terry, ``rm.base_lr``); the paper starts
  from an existing RM_Base. ``eval.eval_rm`` trains a separate evaluation RM (the paper's RM_Test)
  on pairs disjoint from everything else; without it RM_Base scores the policies.
- Every phase's result is stored under a key that names *what* it is computed from (the policy and
  RM versions), so arms share work: round 1 of every arm samples the same initial policy once, the
  ``fixed`` arm re-evaluates RM_Base once. The same store is the checkpoint: a stopped run resumes
  from its last finished phase.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from apo_ray.config import Config, DecodingConfig
from apo_ray.data import (
    GoldenAnswer,
    PreferencePair,
    golden_by_key,
    golden_from_chosen,
    load_golden_answers,
    load_preference_pairs,
    query_key,
    split_for_apo,
)
from apo_ray.metrics import calibration_errors, mean_and_stderr, preference_accuracy
from apo_ray.training import RankedPair

log = logging.getLogger(__name__)

PHASES = ("sample_gold", "train_rm", "sample_queries", "score_samples", "train_policy", "evaluate")


@dataclass
class Weights:
    """A model version. ``id`` names it ("policy/apo/r2"); equal ids mean equal weights.
    ``handle`` is what the system moves around: a state dict in-process, an ObjectRef on Ray,
    ``None`` for the pretrained weights."""

    id: str
    handle: Any = None


class GameSystem(Protocol):
    """What Algorithm 1 needs from the machinery underneath."""

    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig) -> list[list[str]]: ...

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]: ...

    def train_rm(self, init: Weights, pairs: list[RankedPair], *, lr: float, epochs: int, beta2: float,
                 apo_weight: float, seed: int) -> tuple[Any, dict]: ...

    def train_policy(self, init: Weights, examples: list[tuple], *, lr: float, seed: int) -> tuple[Any, dict]: ...

    def save_weights(self, handle: Any, path: Path) -> None: ...

    def load_weights(self, path: Path) -> Any: ...


@dataclass
class GameData:
    gold: list[GoldenAnswer]  # golden queries with their golden answers
    pref_pairs: list[PreferencePair]  # D_P
    llm_queries: list[str]  # D_Q
    dev_pairs: list[PreferencePair]
    test_pairs: list[PreferencePair]
    eval_rm_pairs: list[PreferencePair] = field(default_factory=list)
    gold_source: str = "chosen-fallback"


def build_game_data(cfg: Config) -> GameData:
    """Load, clean and split the preference data; join golden answers to the golden queries."""
    d = cfg.data
    pairs = load_preference_pairs(d.path, clean=d.clean)
    splits = split_for_apo(pairs, seed=d.seed, rm_pairs=d.rm_pairs, llm_queries=d.llm_queries,
                           dev_pairs=d.dev_pairs, test_pairs=d.test_pairs, eval_rm_pairs=d.eval_rm_pairs)
    queries = list(dict.fromkeys(p.prompt for p in splits.rm_pairs))[: d.gold_queries]
    fallback = golden_by_key(golden_from_chosen(splits.rm_pairs))
    source = "chosen-fallback"
    if d.golden_path:
        answers = golden_by_key(load_golden_answers(d.golden_path))
        source = f"file:{d.golden_path}"
        gold = [answers.get(query_key(q), fallback[query_key(q)]) for q in queries]
    else:
        gold = [fallback[query_key(q)] for q in queries]
    log.info("data: %d D_P pairs, %d golden queries (%s), %d LLM queries, %d dev, %d test, %d eval-RM pairs",
             len(splits.rm_pairs), len(gold), source, len(splits.llm_queries), len(splits.dev_pairs),
             len(splits.test_pairs), len(splits.eval_rm_pairs))
    return GameData(gold=gold, pref_pairs=list(splits.rm_pairs), llm_queries=list(splits.llm_queries),
                    dev_pairs=list(splits.dev_pairs), test_pairs=list(splits.test_pairs),
                    eval_rm_pairs=list(splits.eval_rm_pairs), gold_source=source)


class PhaseStore:
    """Results of finished phases on disk: ``<dir>/<key>.json`` plus ``<key>.pt`` for weights.
    A key is written last-step-atomically (temp file + rename), so a killed run never leaves a
    half-written result that looks finished."""

    def __init__(self, root: Path, system: GameSystem):
        self.root = Path(root)
        self.system = system
        self.root.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, suffix: str) -> Path:
        return self.root / (key.replace("/", "__") + suffix)

    def get(self, key: str) -> Any | None:
        path = self._path(key, ".json")
        return json.loads(path.read_text()) if path.exists() else None

    def put(self, key: str, value: Any) -> None:
        path = self._path(key, ".json")
        tmp = path.with_suffix(".tmp")
        tmp.write_text(json.dumps(value))
        tmp.replace(path)

    def get_weights(self, key: str) -> Weights | None:
        meta = self.get(key)
        if meta is None:
            return None
        return Weights(key, self.system.load_weights(self._path(key, ".pt")))

    def put_weights(self, key: str, handle: Any, stats: dict) -> Weights:
        self.system.save_weights(handle, self._path(key, ".pt"))
        self.put(key, stats)  # the .json marks the weights as complete
        return Weights(key, handle)

    def weights_stats(self, key: str) -> dict:
        return self.get(key) or {}


def run_fingerprint(cfg: Config) -> dict:
    """The settings every stored phase depends on; a resumed run must share them (more rounds or
    other arms are fine: they only add phases)."""
    from apo_ray.config import to_dict

    d = to_dict(cfg)
    apo = {k: v for k, v in d["apo"].items() if k not in ("rounds", "arms", "rm_mode")}
    return {"model": d["model"], "data": d["data"], "generation": d["generation"], "rm": d["rm"],
            "policy": d["policy"], "apo": apo, "seed": d["run"]["seed"], "test_queries": d["eval"]["test_queries"],
            "eval_rm": d["eval"]["eval_rm"]}


def _flatten(tree: dict, prefix: str = "") -> dict:
    flat = {}
    for key, value in tree.items():
        if isinstance(value, dict):
            flat |= _flatten(value, f"{prefix}{key}.")
        else:
            flat[f"{prefix}{key}"] = value
    return flat


def open_store(cfg: Config, system: GameSystem) -> PhaseStore:
    """The run's phase store under ``run.output_dir``. Refuses to mix runs: existing phases need
    ``run.resume=true`` and the same settings as the run that wrote them."""
    phases = Path(cfg.run.output_dir) / "phases"
    marker = phases / "fingerprint.json"
    fingerprint = json.loads(json.dumps(run_fingerprint(cfg), default=str))
    if phases.exists() and any(phases.iterdir()):
        if not cfg.run.resume:
            raise RuntimeError(f"{phases} holds phases of an earlier run; pass run.resume=true to continue it "
                               f"or choose another run.output_dir")
        if marker.exists():
            old, new = _flatten(json.loads(marker.read_text())), _flatten(fingerprint)
            changed = sorted(k for k in old.keys() | new.keys() if old.get(k) != new.get(k))
            if changed:
                raise RuntimeError(f"run.resume=true but these settings differ from the run in {phases}: "
                                   f"{', '.join(changed)}; its stored phases would not match them")
    store = PhaseStore(phases, system)
    if not marker.exists():
        marker.write_text(json.dumps(fingerprint, indent=1))
    return store


class APOGame:
    """Runs the arms of one experiment for ``cfg.apo.rounds`` rounds. ``on_phase(event)`` is called
    after every phase (the Ray layer exports metrics and progress from it)."""

    def __init__(self, cfg: Config, system: GameSystem, data: GameData, store: PhaseStore,
                 on_phase: Callable[[dict], None] | None = None):
        self.cfg, self.system, self.data, self.store = cfg, system, data, store
        self.on_phase = on_phase or (lambda event: None)
        self.records: list[dict] = []

    # -- phase plumbing --------------------------------------------------------------------------
    def _phase(self, key: str, compute: Callable[[], Any], timing: dict, name: str, **event) -> Any:
        cached = self.store.get(key)
        if cached is not None:
            timing.setdefault(name, 0.0)
            return cached
        start = time.perf_counter()
        value = compute()
        self.store.put(key, value)
        seconds = time.perf_counter() - start
        timing[name] = timing.get(name, 0.0) + seconds
        self.on_phase({"phase": name, "key": key, "seconds": seconds, **event})
        return value

    def _weights_phase(self, key: str, compute: Callable[[], tuple[Any, dict]], timing: dict, name: str,
                       **event) -> Weights:
        cached = self.store.get_weights(key)
        if cached is not None:
            timing.setdefault(name, 0.0)
            return cached
        start = time.perf_counter()
        handle, stats = compute()
        stats = {k: v for k, v in stats.items() if k != "losses"} | {"losses": stats.get("losses", [])}
        weights = self.store.put_weights(key, handle, stats)
        seconds = time.perf_counter() - start
        timing[name] = timing.get(name, 0.0) + seconds
        self.on_phase({"phase": name, "key": key, "seconds": seconds, **event})
        return weights

    def _samples(self, policy: Weights, prompts: list[str], what: str, seed: int, timing: dict, name: str,
                 n: int, decoding: DecodingConfig | None = None, **event) -> list[list[str]]:
        # Keyed by the policy version, not the arm: arms whose policies are equal share the samples.
        # Game samples use generation.sampling; the test answers pass generation.testing.
        key = f"samples/{policy.id}/{what}"
        decoding = decoding or self.cfg.generation.sampling
        return self._phase(key, lambda: self.system.generate(policy, prompts, n, seed, decoding), timing, name,
                           sequences=len(prompts) * n, **event)

    def _scores(self, rm: Weights, prompts: list[str], responses: list[str], what: str, timing: dict,
                name: str, **event) -> list[float]:
        return self._phase(f"scores/{rm.id}/{what}", lambda: self.system.score(rm, prompts, responses),
                           timing, name, **event)

    # -- the game --------------------------------------------------------------------------------
    def setup(self) -> None:
        """RM_Base (and the evaluation RM) from D_P before round 1; round 0 = the starting point."""
        rm_cfg, timing = self.cfg.rm, {}
        pref = [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in self.data.pref_pairs]
        self.rm_base = self._weights_phase(
            "rm/base", lambda: self.system.train_rm(Weights("rm/pretrained"), pref, lr=rm_cfg.base_lr,
                                                    epochs=rm_cfg.base_epochs, beta2=1.0, apo_weight=0.0,
                                                    seed=self.cfg.run.seed), timing, "train_rm_base")
        self.eval_rm = self.rm_base
        if self.cfg.eval.eval_rm:
            held_out = [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in self.data.eval_rm_pairs]
            self.eval_rm = self._weights_phase(
                "rm/eval", lambda: self.system.train_rm(Weights("rm/pretrained"), held_out, lr=rm_cfg.base_lr,
                                                        epochs=rm_cfg.base_epochs, beta2=1.0, apo_weight=0.0,
                                                        seed=self.cfg.run.seed + 1), timing, "train_eval_rm")
        self.policy0 = Weights("policy/init")
        self.state = {arm: {"policy": self.policy0, "rm": self.rm_base} for arm in self.cfg.arms}
        for arm in self.cfg.arms:
            self.records.append(self.evaluate(0, arm, self.policy0, self.rm_base, dict(timing)))

    def play_round(self, r: int, arm: str) -> dict:
        """One round of Algorithm 1 for one arm: returns its summary record."""
        cfg, S, timing = self.cfg, self.cfg.apo.samples_per_query, {}
        policy, rm = self.state[arm]["policy"], self.state[arm]["rm"]
        event = {"round": r, "arm": arm}
        # In round 1, apo_seq starts from RM_Base like apo: same RM, same policy, computed once.
        lineage = "apo" if arm == "apo_seq" and r == 1 else arm

        # 1-2. The policy answers every golden query S times; D_APO pairs gold against each sample.
        #      (Only the arms that train on D_APO sample it: fixed and ablation never read it.)
        apo_pairs = []
        if arm in ("apo", "apo_seq"):
            gold = self.data.gold
            gold_samples = self._samples(policy, [g.prompt for g in gold], "gold", seed=1000 * r + 1,
                                         timing=timing, name="sample_gold", n=S, **event)
            apo_pairs = [RankedPair(g.prompt, g.response, s, "apo") for g, samples in zip(gold, gold_samples)
                         for s in samples]
        pref_pairs = [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in self.data.pref_pairs]

        # 3. RM update, by mode: from RM_Base (apo), from last round's RM (apo_seq), none (fixed),
        #    or the same fine-tuning without D_APO (ablation, RM_Base-AB).
        if arm != "fixed":
            init = rm if arm == "apo_seq" else self.rm_base
            pairs = pref_pairs if arm == "ablation" else apo_pairs + pref_pairs
            rm = self._weights_phase(
                f"rm/{lineage}/r{r}", lambda: self.system.train_rm(
                    init, pairs, lr=cfg.rm.lr, epochs=cfg.rm.epochs, beta2=cfg.apo.beta2,
                    apo_weight=cfg.apo.apo_weight, seed=cfg.run.seed + r), timing, "train_rm", **event)

        # 4-5. The policy answers every training query S times; the RM keeps the best of S.
        queries = self.data.llm_queries
        samples = self._samples(policy, queries, "queries", seed=1000 * r + 2, timing=timing,
                                name="sample_queries", n=S, **event)
        flat_prompts = [q for q, ss in zip(queries, samples) for _ in ss]
        flat_scores = self._scores(rm, flat_prompts, [s for ss in samples for s in ss],
                                   f"{policy.id}/queries", timing, "score_samples", **event)
        per_query = [flat_scores[i * S:(i + 1) * S] for i in range(len(queries))]
        best = [ss[max(range(S), key=sc.__getitem__)] for ss, sc in zip(samples, per_query)]
        worst = [ss[min(range(S), key=sc.__getitem__)] for ss, sc in zip(samples, per_query)]

        # 6. Policy update: LM loss on (x, y_best) (rejection sampling), or DPO on best vs worst.
        lrs = cfg.policy.lrs
        lr = lrs[min(r - 1, len(lrs) - 1)]
        if cfg.policy.updater == "rjs":
            examples = [(q, b) for q, b in zip(queries, best)]
        else:
            examples = [(q, b, w) for q, b, w in zip(queries, best, worst) if b != w]
        policy = self._weights_phase(
            f"policy/{lineage}/r{r}", lambda: self.system.train_policy(policy, examples, lr=lr, seed=cfg.run.seed + r),
            timing, "train_policy", **event)

        self.state[arm] = {"policy": policy, "rm": rm}
        record = self.evaluate(r, arm, policy, rm, timing)
        record.update(apo_pairs=len(apo_pairs), best_of_s_mean_score=sum(max(sc) for sc in per_query) / len(queries),
                      rm_train=self.store.weights_stats(rm.id) if arm != "fixed" else {},
                      policy_train=self.store.weights_stats(policy.id))
        for train in ("rm_train", "policy_train"):
            record[train] = {k: v for k, v in record[train].items() if k != "losses"}
        return record

    def evaluate(self, r: int, arm: str, policy: Weights, rm: Weights, timing: dict) -> dict:
        """RM accuracy/calibration on dev and test pairs; evaluation-RM score of the policy's test answers."""
        event = {"round": r, "arm": arm}
        start = time.perf_counter()
        metrics = {}
        for split, pairs in (("dev", self.data.dev_pairs), ("test", self.data.test_pairs)):
            if not pairs:
                continue
            prompts = [p.prompt for p in pairs]
            good = self._scores(rm, prompts, [p.chosen for p in pairs], f"{split}/chosen", timing, "evaluate", **event)
            bad = self._scores(rm, prompts, [p.rejected for p in pairs], f"{split}/rejected", timing, "evaluate",
                               **event)
            cal = calibration_errors(good, bad, n_bins=self.cfg.eval.n_bins)
            metrics.update({f"rm_{split}_acc": preference_accuracy(good, bad), f"rm_{split}_ece": cal["ece"],
                            f"rm_{split}_ace": cal["ace"], f"rm_{split}_mce": cal["mce"],
                            f"rm_{split}_bins": cal["bins"]})
        queries = eval_prompts(self.cfg, self.data)
        answers = [a[0] for a in self._samples(policy, queries, "test", seed=7, timing=timing, name="evaluate",
                                               n=1, decoding=self.cfg.generation.testing, **event)]
        rewards = self._scores(self.eval_rm, queries, answers, f"{policy.id}/test", timing, "evaluate", **event)
        mean, stderr = mean_and_stderr(rewards)
        timing["evaluate_total"] = time.perf_counter() - start
        record = {"round": r, "rm_mode": arm, "rm": rm.id, "policy": policy.id, "eval_rm": self.eval_rm.id,
                  "gold_source": self.data.gold_source, **metrics, "policy_mean_reward": mean,
                  "policy_reward_stderr": stderr, "test_queries": len(queries),
                  "phase_seconds": {k: round(v, 3) for k, v in timing.items()}}
        self.on_phase({"phase": "round_done", **event, "record": record})
        return record

    def run(self) -> list[dict]:
        self.records = []
        self.setup()
        for r in range(1, self.cfg.apo.rounds + 1):
            for arm in self.cfg.arms:
                log.info("round %d/%d arm %s: start", r, self.cfg.apo.rounds, arm)
                record = self.play_round(r, arm)
                self.records.append(record)
                log.info("round %d arm %s: rm test acc %.3f ece %.3f, policy mean reward %.3f, phases %s", r, arm,
                         record.get("rm_test_acc", float("nan")), record.get("rm_test_ece", float("nan")),
                         record["policy_mean_reward"], record["phase_seconds"])
        return self.records


def eval_prompts(cfg: Config, data: GameData) -> list[str]:
    """The test prompts every policy answers (and the judge compares), in a fixed order."""
    return list(dict.fromkeys(p.prompt for p in data.test_pairs))[: cfg.eval.test_queries]


def finish_run(cfg: Config, game: APOGame, records: list[dict], *, wall_seconds: float,
               judge: dict | None = None) -> Path:
    """Write ``summary.json``, ``resolved_config.json`` and ``report.md`` with its tables and plots."""
    from apo_ray.config import to_dict
    from apo_ray.report import write_report

    out = Path(cfg.run.output_dir)
    write_summary(out, records, to_dict(cfg))
    d = game.data
    notes = [f"Policy `{cfg.model.policy}`, RM backbone `{cfg.model.reward}`; {cfg.apo.rounds} rounds, "
             f"S = {cfg.apo.samples_per_query}, beta2 = {cfg.apo.beta2}, APO weight = {cfg.apo.apo_weight}.",
             f"Data `{cfg.data.path}`: {len(d.pref_pairs)} D_P pairs, {len(d.gold)} golden queries "
             f"(gold: {d.gold_source}), {len(d.llm_queries)} LLM queries, {len(d.dev_pairs)} dev / "
             f"{len(d.test_pairs)} test pairs, {len(d.eval_rm_pairs)} evaluation-RM pairs.",
             f"Wall time {wall_seconds / 60:.1f} min."]
    return write_report(out, records, judge=judge, notes=notes, title=f"APO run `{cfg.run.name}`")


def write_summary(output_dir: Path, records: list[dict], resolved_config: dict) -> Path:
    """``summary.json``: one record per (round, arm); ``resolved_config.json`` beside it."""
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    (output_dir / "resolved_config.json").write_text(json.dumps(resolved_config, indent=2, default=str))
    path = output_dir / "summary.json"
    path.write_text(json.dumps(records, indent=2))
    return path
