"""The Ray layer: pools of generator/scorer actors, Ray Train learners, object-store weights.

:class:`RaySystem` implements the :class:`apo_ray.game.GameSystem` protocol, so ``game.py``'s loop
runs unchanged on a cluster. Weights handles are ObjectRefs of :class:`apo_ray.weights.PackedWeights`
(one contiguous buffer; read zero-copy on the same node).

Learners: one Ray Train worker group serves every learner phase of a run (:class:`LearnerGroup`);
phases are jobs posted to a mailbox, not fresh ``TorchTrainer`` runs.

Ownership: an object ``ray.put`` by a Ray Train worker dies with that worker (and Ray >= 2.56 has no
``_owner=`` to hand it over). So rank 0 of a learner sends its packed weights to a long-lived
*mailbox* actor (the driver, :class:`LearnerMailbox`), which ``ray.put``s them itself and so owns
them for the whole run.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch

from apo_ray.config import Config, DecodingConfig
from apo_ray.game import Weights
from apo_ray.training import RankedPair
from apo_ray.workers import GeneratorWorker, ScorerWorker

log = logging.getLogger(__name__)

# The only place where plain classes become actors (design.md, layer 3).
GeneratorActor = ray.remote(GeneratorWorker)
ScorerActor = ray.remote(ScorerWorker)


class ShardedPool:
    """N actors of one kind; a call is cut into contiguous shards, one per actor, results in order.

    Actors restart after a crash (``max_restarts``) and Ray retries the shard's call on the restarted
    actor (``max_task_retries``); the versioned-weights protocol of :mod:`apo_ray.workers` makes the
    retried call reload the right weights, so nothing is lost.
    """

    def __init__(self, actor_cls, cfg: Config, n: int, *, cpus: float, gpus: float, name: str, namespace: str | None,
                 max_restarts: int):
        self.name = name
        self.actors = [
            actor_cls.options(name=f"{name}-{i}", namespace=namespace, num_cpus=cpus, num_gpus=gpus,
                              max_restarts=max_restarts, max_task_retries=max_restarts, lifetime=None)
            .remote(cfg, cpus)
            for i in range(n)
        ]

    def map(self, method: str, items: list, make_args) -> list[dict]:
        """Split ``items`` into one contiguous shard per actor; ``make_args(shard, first_index)`` gives
        the call's arguments (``first_index``: the shard's position in ``items``). Returns the
        per-shard result dicts in shard order."""
        n = min(len(self.actors), max(len(items), 1))
        size = -(-len(items) // n)
        refs = [getattr(self.actors[i], method).remote(*make_args(items[i * size:(i + 1) * size], i * size))
                for i in range(n)]
        return ray.get(refs)

    def kill(self, close_timeout_s: float = 60.0) -> None:
        """``close`` each actor where it has one (stops child processes such as vLLM's engine, which
        ``ray.kill``'s SIGKILL would orphan), then kill it."""
        closing = [actor.close.remote() for actor in self.actors if hasattr(actor, "close")]
        if closing:
            try:
                ray.get(closing, timeout=close_timeout_s)
            except Exception as exc:  # noqa: BLE001 - a dead actor or a slow close: kill anyway
                log.warning("%s: close before kill failed: %r", self.name, exc)
        for actor in self.actors:
            ray.kill(actor, no_restart=True)


class LearnerMailbox:
    """The learner protocol's long-lived side, mixed into the driver actor (it must outlive every
    learner worker, since whoever ``ray.put``s an object owns it).

    Callers post jobs per worker group; every rank of the group polls ``next_job``; rank 0 hands
    back the trained weights (``deposit``), which this actor ``ray.put``s and so owns; the caller
    polls ``try_collect``, which also takes the job off the queue. Needs a threaded actor
    (``max_concurrency`` > 1): the driver's ``run`` blocks while the learners call in.
    """

    def __init__(self):
        self._mail_lock = threading.Lock()
        self._jobs: dict[str, list[dict]] = {}
        self._results: dict[str, Any] = {}

    def post_job(self, group: str, job: dict) -> None:
        with self._mail_lock:
            self._jobs.setdefault(group, []).append(job)

    def next_job(self, group: str, done: list[str]) -> dict | None:
        with self._mail_lock:
            return next((job for job in self._jobs.get(group, []) if job["token"] not in done), None)

    def deposit(self, token: str, packed, stats: dict) -> None:
        ref = ray.put(packed)  # put by this long-lived actor, so this actor owns it
        with self._mail_lock:
            self._results[token] = (ref, stats)

    def deposit_error(self, token: str, message: str) -> None:
        with self._mail_lock:
            self._results[token] = message
            self._drop_job(token)  # now, so a restarted worker group does not redo it

    def try_collect(self, token: str) -> list:
        """``[(weights ref, stats)]`` or ``[traceback text]`` once the job is done, else ``[]``
        (a list: the caller receives the ref, not the value)."""
        with self._mail_lock:
            if token not in self._results:
                return []
            self._drop_job(token)
            return [self._results.pop(token)]

    def _drop_job(self, token: str) -> None:
        """Take the job off its group's queue (tokens are unique across groups); hold the lock."""
        for jobs in self._jobs.values():
            jobs[:] = [job for job in jobs if job["token"] != token]

    def close_group(self, group: str) -> None:
        with self._mail_lock:
            self._jobs.pop(group, None)


def _run_learner_job(job: dict, mailbox, *, parallel: str, device: str) -> None:
    """One learner phase on this Ray Train worker: this rank's slice of each step; rank 0 hands the
    trained weights to the mailbox."""
    import ray.train
    import ray.train.torch

    from apo_ray.training import TrainSettings, train_policy, train_reward_model
    from apo_ray.weights import pack_state_dict, unpack_state_dict

    ctx = ray.train.get_context()
    init_ref = job["init"][0]
    init_state = unpack_state_dict(ray.get(init_ref), copy=True) if init_ref is not None else None
    data = ray.get(job["data"][0])
    settings = TrainSettings(**job["settings"], device=device, rank=ctx.get_world_rank(),
                             world_size=ctx.get_world_size())

    def prepare(model):
        if settings.strategy == "deepspeed":
            return model  # deepspeed.initialize wraps it in training._Stepper
        return ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy=parallel)

    train = train_reward_model if job["kind"] == "rm" else train_policy
    state, stats = train(job["model"], init_state, data, settings, prepare_model=prepare, **job["loss"])
    stats["worker_pid"] = os.getpid()  # the same process serves every job of a run
    if ctx.get_world_rank() == 0:
        ray.get(mailbox.deposit.remote(job["token"], pack_state_dict(state), stats))


def _learner_service(config: dict) -> None:
    """Runs on every Ray Train worker for the run's whole life: takes the jobs posted to the mailbox
    under ``config["group"]`` one after another, until a stop job.

    Every rank sees the same jobs in the same order: a job leaves the queue only when its caller
    collects the result, and ``done`` skips those this rank has finished. A worker group that Ray
    Train restarts after a crash starts with ``done`` empty, so it redoes the job in flight.
    """
    import gc
    import traceback

    import ray.train
    import ray.train.torch

    from apo_ray.workers import setup_process

    setup_process(config["cpus_per_worker"])
    device = str(ray.train.torch.get_device())
    rank = ray.train.get_context().get_world_rank()
    mailbox, group, done = config["mailbox"][0], config["group"], []
    while True:
        job = ray.get(mailbox.next_job.remote(group, done))
        if job is None:
            time.sleep(LEARNER_POLL_SECONDS)
            continue
        if job.get("stop"):
            return
        try:
            _run_learner_job(job, mailbox, parallel=config["parallel"], device=device)
        except Exception:
            # A Python error (bad data, non-finite loss) would fail the same way again: hand it to
            # the caller instead of letting Ray Train restart the group to redo it.
            if rank == 0:
                ray.get(mailbox.deposit_error.remote(job["token"], traceback.format_exc()))
            raise
        done.append(job["token"])
        gc.collect()  # the job's model and optimiser state go before the next job loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


LEARNER_POLL_SECONDS = 0.1


class LearnerError(RuntimeError):
    """A learner job failed; the message holds the worker's traceback."""


class LearnerGroup:
    """A Ray Train worker group (one ``TorchTrainer``) that trains the run's RM and policy jobs in turn.

    ``fit()`` runs in a background thread for the group's whole life, so the workers, their process
    group and their warmed-up kernels outlive a phase: a fresh ``TorchTrainer`` per phase cost 15-30 s
    of start-up on 2 CPU cores (14 learner phases in the demo) and left the GPU idle most of a
    demo-sized round. Jobs and results travel through the mailbox (the driver actor), which owns
    every weights object. A crashed worker is restarted by Ray Train (``cluster.max_actor_restarts``
    times) and the job in flight is redone.
    """

    def __init__(self, cfg: Config, mailbox, storage_path: str):
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        c = cfg.cluster
        self.mailbox = mailbox
        self.name = f"apo-learners-{uuid.uuid4().hex[:8]}"
        resources = {"CPU": c.learner_cpus} | ({"GPU": c.learner_gpus} if c.learner_use_gpu else {})
        self.trainer = TorchTrainer(
            _learner_service,
            train_loop_config={"group": self.name, "mailbox": [mailbox], "cpus_per_worker": c.learner_cpus,
                               "parallel": "fsdp" if c.learner_strategy == "fsdp" else "ddp"},
            scaling_config=ScalingConfig(num_workers=c.learner_workers, use_gpu=c.learner_use_gpu,
                                         resources_per_worker=resources),
            torch_config=TorchConfig(backend="nccl" if c.learner_use_gpu else "gloo"),
            run_config=RunConfig(name=self.name, storage_path=storage_path,
                                 failure_config=FailureConfig(max_failures=c.max_actor_restarts)),
        )
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._serve, name=self.name, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        try:
            self.trainer.fit()
        except BaseException as exc:  # noqa: BLE001 - reported to the caller waiting on a job
            self.error = exc

    @property
    def alive(self) -> bool:
        return self.thread.is_alive()

    def run(self, job: dict) -> tuple[Any, dict]:
        """Post ``job`` and wait for its weights ref and stats."""
        ray.get(self.mailbox.post_job.remote(self.name, job))
        while True:
            done = ray.get(self.mailbox.try_collect.remote(job["token"]))
            if done:
                outcome = done[0]
                if isinstance(outcome, str):
                    raise LearnerError(f"learner job {job['token']} ({job['kind']}) failed:\n{outcome}")
                return outcome
            if not self.alive:
                ray.get(self.mailbox.close_group.remote(self.name))
                raise LearnerError(f"learner group {self.name} stopped before finishing {job['token']}: "
                                   f"{self.error!r}") from self.error
            time.sleep(LEARNER_POLL_SECONDS)

    def stop(self, timeout_s: float = 120.0) -> None:
        if self.alive:
            ray.get(self.mailbox.post_job.remote(self.name, {"stop": True, "token": "stop"}))
            self.thread.join(timeout_s)
            if self.alive:
                log.warning("learner group %s did not stop within %.0f s", self.name, timeout_s)
        ray.get(self.mailbox.close_group.remote(self.name))


class RaySystem:
    """GameSystem on Ray. ``mailbox``: a long-lived threaded actor that is a :class:`LearnerMailbox`
    (the driver); it owns every weights object of the run."""

    def __init__(self, cfg: Config, mailbox, *, namespace: str | None = None, storage_path: str | None = None):
        c = cfg.cluster
        self.cfg, self.mailbox = cfg, mailbox
        self.storage_path = storage_path or str(Path(cfg.run.output_dir) / "ray_train")
        self.generators = ShardedPool(GeneratorActor, cfg, c.num_generators, cpus=c.generator_cpus,
                                      gpus=c.generator_gpus, name="apo-generator", namespace=namespace,
                                      max_restarts=c.max_actor_restarts)
        self.scorers = ShardedPool(ScorerActor, cfg, c.num_scorers, cpus=c.scorer_cpus, gpus=c.scorer_gpus,
                                   name="apo-scorer", namespace=namespace, max_restarts=c.max_actor_restarts)
        self.learners: LearnerGroup | None = None
        self.last_generation: dict[str, float] = {}
        self.last_sync: dict[str, float] = {}

    # -- pools -------------------------------------------------------------------------------------
    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> list[list[str]]:
        start = time.perf_counter()
        results = self.generators.map(
            "generate", prompts, lambda shard, first: (policy.id, [policy.handle], shard, n, seed, decoding, first))
        seconds = time.perf_counter() - start
        tokens = sum(r["new_tokens"] for r in results)
        self.last_generation = {"sequences": len(prompts) * n, "new_tokens": tokens, "seconds": seconds,
                                "samples_per_s": len(prompts) * n / max(seconds, 1e-9),
                                "tokens_per_s": tokens / max(seconds, 1e-9)}
        self.last_sync = {"seconds": sum(r["sync_seconds"] for r in results),
                          "bytes": sum(r["sync_bytes"] for r in results)}
        return [s for r in results for s in r["samples"]]

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        pairs = list(zip(prompts, responses))
        results = self.scorers.map(
            "score", pairs, lambda shard, first: (rm.id, [rm.handle], [p for p, _ in shard], [r for _, r in shard]))
        return [s for r in results for s in r["scores"]]

    # -- learners ----------------------------------------------------------------------------------
    def _fit(self, kind: str, init: Weights, data: list, settings: dict, loss: dict) -> tuple[Any, dict]:
        if self.learners is None or not self.learners.alive:
            # One worker group for the whole run (started at the first learner phase, so a resumed
            # run whose learner phases are all done never starts one).
            self.learners = LearnerGroup(self.cfg, self.mailbox, self.storage_path)
        token = f"{kind}-{uuid.uuid4().hex[:8]}"
        model = self.cfg.model.reward if kind == "rm" else self.cfg.model.policy
        job = {"kind": kind, "model": model, "init": [init.handle], "data": [ray.put(data)],
               "settings": settings, "loss": loss, "token": token}
        start = time.perf_counter()
        ref, stats = self.learners.run(job)
        stats["fit_seconds"] = time.perf_counter() - start
        return ref, stats

    def _settings(self, section: str, lr: float, epochs: int, seed: int) -> dict:
        from apo_ray.local import policy_settings, rm_settings

        make = rm_settings if section == "rm" else policy_settings
        kwargs = {"lr": lr, "seed": seed} | ({"epochs": epochs} if section == "rm" else {})
        s = make(self.cfg, **kwargs)
        s.strategy = "deepspeed" if self.cfg.cluster.learner_strategy == "deepspeed" else "ddp"
        s.zero_stage = self.cfg.cluster.deepspeed_stage
        return {k: getattr(s, k) for k in ("lr", "examples_per_step", "micro_examples", "max_length", "epochs",
                                           "weight_decay", "precision", "seed", "gradient_checkpointing",
                                           "trainable_layers", "compile",
                                           "max_grad_norm", "strategy", "zero_stage", "log_every_steps")}

    def train_rm(self, init: Weights, pairs: list[RankedPair], *, lr, epochs, beta2, apo_weight, seed):
        return self._fit("rm", init, pairs, self._settings("rm", lr, epochs, seed),
                         {"beta2": beta2, "apo_weight": apo_weight})

    def train_policy(self, init: Weights, examples: list[tuple], *, lr, seed):
        return self._fit("policy", init, examples, self._settings("policy", lr, 1, seed),
                         {"updater": self.cfg.policy.updater, "dpo_beta": self.cfg.policy.dpo_beta})

    # -- checkpoints (disk is for resume only) -----------------------------------------------------
    def save_weights(self, handle: Any, path: Path) -> None:
        from apo_ray.weights import unpack_state_dict

        tmp = Path(path).with_suffix(".pt.tmp")
        torch.save(unpack_state_dict(ray.get(handle), copy=True), tmp)
        tmp.replace(path)

    def load_weights(self, path: Path) -> Any:
        from apo_ray.weights import pack_state_dict

        return ray.put(pack_state_dict(torch.load(path, map_location="cpu", weights_only=True)))

    def shutdown(self) -> None:
        if self.learners is not None:
            self.learners.stop()
        self.generators.kill()
        self.scorers.kill()
