"""Algorithm 1 of the APO paper (RM-LLM game with rejection sampling), written once.

The loop is written against :class:`GameSystem`, so the same code runs in one process
(:class:`apo_ray.runtime.in_process.InProcessSystem`) and on Ray actors (:class:`apo_ray.runtime.ray_system.RaySystem`).
Each round of each arm (an RM update mode) does, as in the paper:

1. sample S responses from the current policy for every golden query;
2. D_APO = {(x, y_gold, y_sample)};
3. update the RM with L_APO-RM = apo_weight * L_rank(D_APO) + beta2 * L_rank(D_P)
   (``losses.apo_rm_loss``; the arm's entry in ``arms.ARM_TABLE`` says from which RM and on
   which pairs);
4. sample S responses for every LLM training query;
5. keep the best of S under the RM (never an empty one);
6. fine-tune the policy on (x, y_best) (LM loss on response tokens; or DPO on best vs worst: the
   policy objectives of ``objectives.py``);
then evaluates the RM (dev/test accuracy, ECE) and the policy (evaluation-RM score of its test answers).

How it departs from the paper / design choices:
- Before round 1, RM_Base is trained on D_P (plain Bradley-Terry, ``rm.base_lr``); the paper starts
  from an existing RM_Base. Evaluation RMs, which no arm trains against, score the policies' test
  answers: the paper's RM_Test (``eval.rm_test``: every training pair) and RM_All
  (``eval.rm_all_paths``: those plus further preference sets), or a small held-out one
  (``eval.eval_rm``: the ``data.eval_rm_pairs`` block). Without any, RM_Base scores them, and the
  log and the report say loudly that the fixed arm's policies are then scored by their own RM.
- Best-of-S never picks an empty response (the authors skip them); a query whose S samples are all
  empty is left out of the policy update and counted.
- Every phase's result is stored under a key that names *what* it is computed from (the policy and
  RM versions), so arms share work: round 1 of every arm samples the same initial policy once, the
  ``fixed`` arm re-evaluates RM_Base once. The same store is the checkpoint: a stopped run resumes
  from its last finished phase.
- ``run.seed`` reaches every random choice of the game (:meth:`APOGame.seed`): RM and policy
  initialisation (the RM's scalar head) and shuffles, the golden-query and training-query samples,
  and the policies' test answers. ``data.seed`` alone decides the split, so runs that differ only
  in ``run.seed`` see the same blocks (the same test pairs), and their spread is that of training
  and sampling. Within a run every policy answers the test prompts with the same seed.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from apo_ray.config import Config, DecodingConfig
from apo_ray.core.arms import get_arm, scored_by_rm_base_warning
from apo_ray.core.metrics import calibration_errors, mean_and_stderr, preference_accuracy
from apo_ray.core.objectives import policy_objective
from apo_ray.data import RankedPair
from apo_ray.game.events import ArmRoundFinished, GameEvent, PhaseFinished, RoundFinished, RoundRecord
from apo_ray.game.game_data import GameData, eval_prompts
from apo_ray.game.store import TEST_SOURCES_KEY, PhaseStore
from apo_ray.game.system import GameSystem, Generated, Weights
from apo_ray.models.loading import cache_dir
from apo_ray.models.training import LearnerJob, RMLoss

log = logging.getLogger(__name__)

class APOGame:
    """Runs the arms of one experiment for ``cfg.apo.rounds`` rounds. ``on_event(event)`` is called
    with a typed event (:mod:`apo_ray.game.events`) after every phase, arm-round and round."""

    def __init__(self, cfg: Config, system: GameSystem, data: GameData, store: PhaseStore,
                 on_event: Callable[[GameEvent], None] | None = None,
                 shared_store: Callable[[Path], PhaseStore] | None = None):
        self.cfg, self.system, self.data, self.store = cfg, system, data, store
        self.on_event = on_event or (lambda event: None)
        self.records: list[RoundRecord] = []
        # The versions the game holds (set up by setup(), then replaced round by round).
        self.rm_base: Weights | None = None
        self.eval_rms: dict[str, Weights] = {}
        self.state: dict[str, dict[str, Weights]] = {}
        a = cfg.apo
        self.apo_loss = RMLoss(beta2=a.beta2, apo_weight=a.apo_weight, reduction=a.loss_reduction,
                               samples_per_query=a.samples_per_query)
        self.objective = policy_objective(cfg.policy.objective, dpo_beta=cfg.policy.dpo_beta)
        # Where shared evaluation RMs are kept (a folder per RM); the planner passes an in-memory one.
        self.shared_store = shared_store or (lambda folder: PhaseStore(folder, system))
        self.shared_stores: dict[str, PhaseStore] = {}
        self.eval_rm_quality: dict[str, dict] = {}

    # Seeds of one run lie in [run.seed * SEED_STRIDE, (run.seed + 1) * SEED_STRIDE), so runs with
    # other seeds never reuse them (offsets are < 1000 * (rounds + 1)); run.seed 0 gives the offsets.
    SEED_STRIDE = 1_000_003

    def seed(self, offset: int) -> int:
        """The seed of one random choice of this run: ``offset`` names the choice (e.g. 1000 * r + 1:
        round r's golden-query samples), ``run.seed`` the run."""
        return self.cfg.run.seed * self.SEED_STRIDE + offset

    # -- phase plumbing --------------------------------------------------------------------------
    def _phase(self, key: str, compute: Callable[[], Any], timing: dict, name: str, **event) -> Any:
        """The stored result of ``key``, or ``compute()`` stored under it. A :class:`Generated`
        result stores its samples; its stats go into the phase event."""
        cached = self.store.get(key)
        if cached is not None:
            timing.setdefault(name, 0.0)
            return cached
        start = time.perf_counter()
        value = compute()
        generation = None
        if isinstance(value, Generated):
            generation, value = value.stats, value.samples
        self.store.put(key, value)
        seconds = time.perf_counter() - start
        timing[name] = timing.get(name, 0.0) + seconds
        self.on_event(PhaseFinished(name, key, seconds, round=event.get("round"), arm=event.get("arm"),
                                    items=event.get("sequences"), generation=generation))
        return value

    def live_versions(self) -> list[Weights]:
        """The model versions a later phase can still read, which is all the run keeps alive (in
        the object store on Ray): RM_Base, the evaluation RMs and each arm's current RM and policy.
        A version superseded in every arm is referenced nowhere else, so it is released (its
        checkpoint stays on disk)."""
        versions = [self.rm_base, *self.eval_rms.values()]
        for held in self.state.values():
            versions += [held["rm"], held["policy"]]
        return [w for w in versions if w is not None]

    @staticmethod
    def _checkpoint(store: PhaseStore, key: str, handle: Any, stats: dict, *, base: str | None,
                    base_model: str) -> tuple[Weights, dict]:
        """Checkpoint a learner's result: the tensors it trained (``stats["trained_tensors"]``), over
        those of ``base``; the stats are stored beside it, per-step losses last. Returns the version
        and the stats as stored."""
        trained = stats.get("trained_tensors")
        stats = {k: v for k, v in stats.items() if k not in ("losses", "trained_tensors")} | {
            "losses": stats.get("losses", [])}
        return store.put_version(key, handle, stats, base=base, base_model=base_model, trained=trained), stats

    def _weights_phase(self, key: str, compute: Callable[[], tuple[Any, dict]], timing: dict, name: str,
                       base: Weights | None = None, **event) -> Weights:
        # A version another arm holds already (apo_seq's round 1 is apo's) is shared, not loaded again.
        live = next((w for w in self.live_versions() if w.id == key and w.handle is not None), None)
        if live is not None:
            timing.setdefault(name, 0.0)
            return live
        cached = self.store.get_version(key)
        if cached is not None:
            timing.setdefault(name, 0.0)
            return cached
        start = time.perf_counter()
        handle, stats = compute()
        weights, stats = self._checkpoint(
            self.store, key, handle, stats, base=None if base is None else base.id,
            base_model=self.cfg.model.reward if key.startswith("rm/") else self.cfg.model.policy)
        seconds = time.perf_counter() - start
        timing[name] = timing.get(name, 0.0) + seconds
        self.on_event(PhaseFinished(name, key, seconds, round=event.get("round"), arm=event.get("arm"),
                                    items=stats.get("pairs") or stats.get("examples"), train=stats))
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
                           timing, name, sequences=len(responses), **event)

    def _train_rm(self, key: str, init: Weights, pairs: list[RankedPair], *, lr: float, epochs: int, seed: int,
                  loss: RMLoss, timing: dict, name: str, **event) -> Weights:
        job = LearnerJob.rm(self.cfg, lr=lr, epochs=epochs, seed=seed, loss=loss)
        return self._weights_phase(key, lambda: self.system.train(job, init, pairs), timing, name, base=init,
                                   **event)

    # -- the game --------------------------------------------------------------------------------
    def setup(self) -> None:
        """RM_Base (and the evaluation RM) from D_P before round 1; round 0 = the starting point."""
        rm_cfg, timing = self.cfg.rm, {}
        # Which data source each test pair came from, beside the per-item scores, so a report can
        # break accuracy down by subset (harmless-base vs helpful-base) item by item.
        # Written once: a resumed run rewrites no finished phase's file.
        sources = [p.source for p in self.data.test_pairs]
        if self.store.get(TEST_SOURCES_KEY) != sources:
            self.store.put(TEST_SOURCES_KEY, sources)
        pretrained = Weights("rm/pretrained")
        pref = [RankedPair.from_preference(p) for p in self.data.pref_pairs]
        self.rm_base = self._train_rm("rm/base", pretrained, pref, lr=rm_cfg.base_lr, epochs=rm_cfg.base_epochs,
                                      seed=self.seed(0), loss=RMLoss(), timing=timing, name="train_rm_base")
        # Evaluation RMs, trained once; the last one that is on scores `policy_mean_reward` (the
        # paper's Table 3 uses RM_All), every one of them lands in `policy_rewards`.
        self.eval_rms = {}
        for key, on, pairs, seed in (
                ("rm/eval", self.cfg.eval.eval_rm, self.data.eval_rm_pairs, 1),
                ("rm/eval_test", self.cfg.eval.rm_test, self.data.train_pairs, 2),
                ("rm/eval_all", bool(self.cfg.eval.rm_all_paths),
                 self.data.train_pairs + self.data.rm_all_extra_pairs, 3)):
            if on:
                self.eval_rms[key] = self._eval_rm(key, [RankedPair.from_preference(p) for p in pairs], seed,
                                                   timing)
        self.eval_rm = list(self.eval_rms.values())[-1] if self.eval_rms else self.rm_base
        if not self.eval_rms:
            self.eval_rms[self.rm_base.id] = self.rm_base
            log.warning(scored_by_rm_base_warning(self.cfg.arms))
        # How good the judges of the policy rows are: every evaluation RM on the test pairs.
        self.eval_rm_quality = {w.id: self._eval_rm_test_metrics(w, timing) for w in self.eval_rms.values()}
        self.policy0 = Weights("policy/init")
        self.state = {arm: {"policy": self.policy0, "rm": self.rm_base} for arm in self.cfg.arms}
        for arm in self.cfg.arms:
            self.records.append(self.evaluate(0, arm, self.policy0, self.rm_base, dict(timing)))

    def play_round(self, r: int, arm: str) -> RoundRecord:
        """One round of Algorithm 1 for one arm: returns its summary record."""
        cfg, S, timing = self.cfg, self.cfg.apo.samples_per_query, {}
        mode = get_arm(arm)
        policy, rm = self.state[arm]["policy"], self.state[arm]["rm"]
        event = {"round": r, "arm": arm}
        lineage = mode.lineage(r)  # e.g. apo_seq's round 1 is apo's: same RM, same policy, computed once

        # 1-2. The policy answers every golden query S times; D_APO pairs gold against each sample.
        #      (Only modes that train on D_APO sample it.)
        apo_pairs = []
        if mode.trains_on_apo_pairs:
            gold = self.data.gold
            gold_samples = self._samples(policy, [g.prompt for g in gold], "gold", seed=self.seed(1000 * r + 1),
                                         timing=timing, name="sample_gold", n=S, **event)
            apo_pairs = [RankedPair(g.prompt, g.response, s, "apo") for g, samples in zip(gold, gold_samples)
                         for s in samples]

        # 3. RM update: from RM_Base or from the arm's previous RM, on D_APO + D_P (the ablation:
        #    on D_P alone); the fixed arm keeps RM_Base.
        apo_acc = {}
        if mode.trains_rm:
            init = rm if mode.rm_init == "previous" else self.rm_base
            loss = self.apo_loss
            if mode.apo_step_matched:  # APO's D_APO slots, unread: the same steps with the same D_P pairs
                apo_pairs = [RankedPair("", "", "", "apo")] * (len(self.data.gold) * S)
                loss = dataclasses.replace(loss, skip_apo_pairs=True)
            pairs = apo_pairs + [RankedPair.from_preference(p) for p in self.data.pref_pairs]
            if mode.trains_on_apo_pairs:
                apo_acc["rm_apo_acc_before"] = self._apo_accuracy(init, policy, apo_pairs, timing, **event)
            rm = self._train_rm(f"rm/{lineage}/r{r}", init, pairs, lr=cfg.rm.lr, epochs=cfg.rm.epochs,
                                seed=self.seed(r), loss=loss, timing=timing, name="train_rm", **event)
            if mode.trains_on_apo_pairs:
                apo_acc["rm_apo_acc_after"] = self._apo_accuracy(rm, policy, apo_pairs, timing, **event)
                log.info("round %d arm %s: D_APO accuracy (gold over sample) %.3f before the RM update, %.3f after",
                         r, arm, apo_acc["rm_apo_acc_before"], apo_acc["rm_apo_acc_after"])

        # 4-5. The policy answers every training query S times; the RM scores every sample and the
        #      policy objective picks each query's example (RJS: the best of S; DPO: best and worst).
        queries = self.data.llm_queries
        samples = self._samples(policy, queries, "queries", seed=self.seed(1000 * r + 2), timing=timing,
                                name="sample_queries", n=S, **event)
        flat_prompts = [q for q, ss in zip(queries, samples) for _ in ss]
        flat_scores = self._scores(rm, flat_prompts, [s for ss in samples for s in ss],
                                   f"{policy.id}/queries", timing, "score_samples", **event)
        per_query = [flat_scores[i * S:(i + 1) * S] for i in range(len(queries))]
        picked = [self.objective.select(ss, sc) for ss, sc in zip(samples, per_query)]
        examples = [(q, *responses) for q, responses in zip(queries, picked) if responses]
        if not examples:
            raise RuntimeError(f"round {r} arm {arm}: none of the {len(queries)} LLM queries gave a training example "
                               f"(all {S} samples empty, or no distinct best and worst); nothing to fine-tune on")
        # the best non-empty sample's score of each query that has one
        best_scores = [max(x for t, x in zip(ss, sc) if t.strip()) for ss, sc in zip(samples, per_query)
                       if any(t.strip() for t in ss)]

        # 6. Policy update on those examples, at this round's learning rate.
        lrs = cfg.policy.lrs
        job = LearnerJob.policy(cfg, lr=lrs[min(r - 1, len(lrs) - 1)], seed=self.seed(r))
        policy = self._weights_phase(f"policy/{lineage}/r{r}", lambda: self.system.train(job, policy, examples),
                                     timing, "train_policy", base=policy, **event)

        self.state[arm] = {"policy": policy, "rm": rm}
        record = self.evaluate(r, arm, policy, rm, timing)
        record.update(apo_acc)
        record.update(apo_pairs=len(apo_pairs) if mode.trains_on_apo_pairs else 0, best_of_s_mean_score=sum(best_scores) / len(best_scores),
                      empty_samples=sum(not t.strip() for ss in samples for t in ss),
                      queries_skipped=len(queries) - len(examples),
                      rm_train=self.store.version_stats(rm.id) if mode.trains_rm else {},
                      policy_train=self.store.version_stats(policy.id))
        for train in ("rm_train", "policy_train"):  # per-step lists stay in the phase store
            record[train] = {k: v for k, v in record[train].items() if k not in ("losses", "lrs")}
        return record

    def _eval_rm(self, key: str, pairs: list[RankedPair], offset: int, timing: dict) -> Weights:
        """The evaluation RM ``key`` on ``pairs``: with ``eval.share_rms``, trained once per (pairs,
        RM settings, data.seed) in the shared folder and reused by every run.seed; else per run."""
        rm_cfg = self.cfg.rm
        if not self.cfg.eval.share_rms:
            return self._train_rm(key, Weights("rm/pretrained"), pairs, lr=rm_cfg.base_lr, epochs=rm_cfg.base_epochs,
                                  seed=self.seed(offset), loss=RMLoss(), timing=timing, name="train_eval_rm")
        # data.seed, not run.seed: the same evaluation RM for every seed of the same data blocks
        job = LearnerJob.rm(self.cfg, lr=rm_cfg.base_lr, epochs=rm_cfg.base_epochs,
                            seed=self.cfg.data.seed * self.SEED_STRIDE + offset, loss=RMLoss())
        store = self.shared_stores.setdefault(key, self.shared_store(shared_rm_folder(self.cfg, job, pairs)))
        cached = store.get_version("rm")
        if cached is not None:
            timing.setdefault("train_eval_rm", 0.0)
            log.info("%s: the shared evaluation RM in %s (trained once for these pairs and settings)", key,
                     getattr(store, "root", "memory"))
            if not self.store.has(key):
                self.store.adopt_weights(key, store, "rm")
            return Weights(key, cached.handle, cached.checkpoint)
        start = time.perf_counter()
        handle, stats = self.system.train(job, Weights("rm/pretrained"), pairs)
        stored, stats = self._checkpoint(store, "rm", handle, stats, base="rm/pretrained",
                                         base_model=self.cfg.model.reward)
        self.store.adopt_weights(key, store, "rm")
        seconds = time.perf_counter() - start
        timing["train_eval_rm"] = timing.get("train_eval_rm", 0.0) + seconds
        self.on_event(PhaseFinished("train_eval_rm", key, seconds, items=stats.get("pairs"), train=stats))
        return Weights(key, handle, stored.checkpoint)

    def _eval_rm_test_metrics(self, rm: Weights, timing: dict) -> dict:
        """``{"acc", "ece", "n"}`` of an evaluation RM on the test pairs (kept beside a shared RM, so
        every seed reads the same numbers); {} without test pairs."""
        pairs = self.data.test_pairs
        if not pairs:
            return {}
        prompts = [p.prompt for p in pairs]
        shared = self.shared_stores.get(rm.id)
        scores = []
        for side, texts in (("chosen", [p.chosen for p in pairs]), ("rejected", [p.rejected for p in pairs])):
            if shared is None:
                scores.append(self._scores(rm, prompts, texts, f"test/{side}", timing, "evaluate"))
                continue
            key = f"test_{pairs_digest(pairs)}_{side}"
            value = shared.get(key)
            if value is None:
                value = self.system.score(rm, prompts, texts)
                shared.put(key, value)
            self.store.put(f"scores/{rm.id}/test/{side}", value)  # beside the run's other per-item scores
            scores.append(value)
        cal = calibration_errors(*scores, n_bins=self.cfg.eval.n_bins)
        return {"acc": preference_accuracy(*scores), "ece": cal["ece"], "n": len(pairs)}

    def _apo_accuracy(self, rm: Weights, policy: Weights, apo_pairs: list[RankedPair], timing: dict,
                      **event) -> float:
        """Share of D_APO pairs whose gold answer ``rm`` scores above the policy's sample: before
        its update, how well the RM already separates them; after, what the APO term achieved (an
        RM that learnt the gold/sample difference at all climbs towards 1)."""
        prompts = [p.prompt for p in apo_pairs]
        gold = self._scores(rm, prompts, [p.good for p in apo_pairs], f"{policy.id}/gold_pairs/gold", timing,
                            "score_apo_pairs", **event)
        samples = self._scores(rm, prompts, [p.bad for p in apo_pairs], f"{policy.id}/gold_pairs/sample", timing,
                               "score_apo_pairs", **event)
        return preference_accuracy(gold, samples)

    def evaluate(self, r: int, arm: str, policy: Weights, rm: Weights, timing: dict) -> RoundRecord:
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
        answers = [a[0] for a in self._samples(policy, queries, "test", seed=self.seed(7), timing=timing,
                                               name="evaluate", n=1,
                                               decoding=self.cfg.generation.testing, **event)]
        policy_rewards, primary_scores = {}, []
        for eval_rm in self.eval_rms.values():
            rewards = self._scores(eval_rm, queries, answers, f"{policy.id}/test", timing, "evaluate", **event)
            mean, stderr = mean_and_stderr(rewards)
            policy_rewards[eval_rm.id] = {"mean": mean, "stderr": stderr}
            if eval_rm.id == self.eval_rm.id:
                primary_scores = [float(x) for x in rewards]
        timing["evaluate_total"] = time.perf_counter() - start
        primary = policy_rewards[self.eval_rm.id]
        record: RoundRecord = {"round": r, "rm_mode": arm, "rm": rm.id, "policy": policy.id, "eval_rm": self.eval_rm.id,
                  "eval_rm_is_rm_base": self.eval_rm.id == self.rm_base.id,
                  "gold_source": self.data.gold_source, "gold_counts": self.data.gold_counts, **metrics,
                  "policy_mean_reward": primary["mean"], "policy_reward_stderr": primary["stderr"],
                  "eval_rm_test_acc": self.eval_rm_quality.get(self.eval_rm.id, {}).get("acc"),
                  "eval_rm_test_ece": self.eval_rm_quality.get(self.eval_rm.id, {}).get("ece"),
                  "eval_rm_quality": self.eval_rm_quality,
                  "policy_rewards": policy_rewards, "test_queries": len(queries),
                  "phase_seconds": {k: round(v, 3) for k, v in timing.items()}}
        self.on_event(ArmRoundFinished(r, arm, record, test_prompts=queries, test_answers=answers,
                                       test_scores=primary_scores))
        return record

    def run(self) -> list[RoundRecord]:
        self.records = []
        self.setup()
        self.round_end(0)
        for r in range(1, self.cfg.apo.rounds + 1):
            for arm in self.cfg.arms:
                if r > (self.cfg.apo.arm_rounds or {}).get(arm, self.cfg.apo.rounds):
                    continue  # this arm's comparisons end earlier (apo.arm_rounds)
                log.info("round %d/%d arm %s: start", r, self.cfg.apo.rounds, arm)
                record = self.play_round(r, arm)
                self.records.append(record)
                log.info("round %d arm %s: rm test acc %.3f ece %.3f, policy mean reward %.3f, phases %s", r, arm,
                         record.get("rm_test_acc", float("nan")), record.get("rm_test_ece", float("nan")),
                         record["policy_mean_reward"], record["phase_seconds"])
            self.round_end(r)
        return self.records

    def round_end(self, r: int) -> None:
        """After every arm's round ``r`` (0: setup): what the system holds now (on Ray, the object
        store's bytes, flat from round 1 on: :meth:`live_versions`), logged, sent as a
        ``round_end`` event and kept in the round's records."""
        usage = self.system.resource_usage()
        if not usage:
            return
        live = {w.id for w in self.live_versions() if w.handle is not None}
        log.info("round %d done: %d model versions alive (%s); %s", r, len(live), ", ".join(sorted(live)),
                 format_usage(usage))
        for record in self.records:
            if record["round"] == r:
                record["resources_after_round"] = usage | {"model_versions_alive": len(live)}
        self.on_event(RoundFinished(r, tuple(sorted(live)), dict(usage)))


def pairs_digest(pairs: list) -> str:
    """A short sha256 of preference pairs' texts (PreferencePair or RankedPair), in order."""
    h = hashlib.sha256()
    for p in pairs:
        texts = (p.prompt, p.chosen, p.rejected) if hasattr(p, "chosen") else (p.prompt, p.good, p.bad, p.kind)
        h.update(json.dumps(texts).encode("utf-8"))
    return h.hexdigest()[:16]


def shared_rm_folder(cfg: Config, job: LearnerJob, pairs: list[RankedPair]) -> Path:
    """The folder of a shared evaluation RM: named by everything its weights depend on (the
    backbone, the learner settings with its seed, the pairs' texts), never by run.seed."""
    settings = {k: v for k, v in dataclasses.asdict(job.settings).items()
                if k not in ("device", "rank", "world_size", "log_every_steps")}
    spec = json.dumps({"model": job.model, "settings": settings, "loss": dataclasses.asdict(job.loss),
                       "pairs": pairs_digest(pairs), "n": len(pairs)}, sort_keys=True, default=str)
    root = Path(cfg.eval.shared_rm_dir) if cfg.eval.shared_rm_dir else cache_dir() / "eval_rms"
    return root / hashlib.sha256(spec.encode("utf-8")).hexdigest()[:20]


def format_usage(usage: dict[str, float]) -> str:
    """``object store 12.3 MiB in 7 objects`` (the parts ``usage`` has)."""
    if "object_store_bytes" not in usage:
        return ", ".join(f"{k} {v}" for k, v in usage.items())
    text = f"object store {usage['object_store_bytes'] / 2**20:.1f} MiB"
    if "object_store_objects" in usage:
        text += f" in {int(usage['object_store_objects'])} objects"
    return text
