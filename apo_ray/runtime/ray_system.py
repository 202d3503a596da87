"""The Ray layer: pools of generator/scorer actors, one Ray Train learner group, object-store weights.

:class:`RaySystem` implements the :class:`apo_ray.game.system.GameSystem` protocol, so ``game.py``'s loop
runs unchanged on a cluster. Weights handles are ObjectRefs of :class:`apo_ray.models.weights.PackedWeights`
(one contiguous buffer; read zero-copy on the same node).

Learners: one Ray Train worker group (one ``TorchTrainer``) serves every learner phase of a run.
``TorchTrainer.fit`` runs in a Ray task for the group's life; its workers take
:class:`apo_ray.models.training.LearnerJob` s from a :class:`LearnerQueue` (an async actor: ranks await the
next job, callers await its outcome, nothing polls). Rank 0 puts the trained weights in the object
store itself, so it owns them: one copy, alive while the run holds a reference. If rank 0 dies
(the group restarts), the versions it owned are reloaded from their checkpoints on their next use
(``workers.fetch_weights``).
"""

from __future__ import annotations

import asyncio
import logging
import os
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import ray
import torch
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from apo_ray.config import Config, DecodingConfig
from apo_ray.game.store import load_checkpoint, write_checkpoint
from apo_ray.game.system import (
    Generated,
    Weights,
    generate_calls,
    in_input_order,
    merge_generated,
    score_calls,
)
from apo_ray.models.training import LearnerJob, run_job
from apo_ray.models.weights import PackedWeights, pack_state_dict, put_weights, unpack_state_dict
from apo_ray.runtime.telemetry import object_store_usage
from apo_ray.runtime.workers import GeneratorWorker, ScorerWorker, fetch_weights, setup_process
from apo_ray.storage import is_uri, join

log = logging.getLogger(__name__)

# The only place where the pools' plain classes become actors (docs/architecture.md: runtime layer).
GeneratorActor = ray.remote(GeneratorWorker)
ScorerActor = ray.remote(ScorerWorker)


class ShardedPool:
    """N actors of one kind; a list of calls is dealt round-robin over them, results in call order.

    Actors restart after a crash (``max_restarts``) and Ray retries the call on the restarted actor
    (``max_task_retries``); the versioned-weights protocol of :mod:`apo_ray.runtime.workers` makes the
    retried call reload the right weights, so nothing is lost.
    """

    def __init__(self, actor_cls, cfg: Config, n: int, *, cpus: float, gpus: float, name: str, namespace: str | None,
                 max_restarts: int, resources: dict[str, float] | None = None,
                 unavailable_wait_s: float = 600.0):
        self.name, self.unavailable_wait_s = name, unavailable_wait_s
        self.actors = [
            actor_cls.options(name=f"{name}-{i}", namespace=namespace, num_cpus=cpus, num_gpus=gpus,
                              resources=dict(resources or {}),  # custom: which nodes may hold it
                              max_restarts=max_restarts, max_task_retries=max_restarts, lifetime=None)
            .remote(cfg, cpus)
            for i in range(n)
        ]

    def call_all(self, method: str, calls: list[tuple]) -> list:
        """``method(*args)`` for each ``args`` of ``calls``, call k on actor k mod N (each actor runs
        its calls one after another). Returns the results in call order.

        A call whose actor is unreachable (its node was lost; Ray answers ``ActorUnavailableError``
        and does not retry it) is asked again until the actor is back, restarted on a node that
        can hold it, for up to ``unavailable_wait_s``: the calls are pure functions of their
        arguments (versioned weights), so a call that may have run once already is safe to repeat."""
        def submit(k: int):
            return getattr(self.actors[k % len(self.actors)], method).remote(*calls[k])

        refs = [submit(k) for k in range(len(calls))]
        results, deadline = [], None
        for k in range(len(calls)):
            while True:
                try:
                    results.append(ray.get(refs[k]))
                    break
                except ray.exceptions.ActorUnavailableError as exc:
                    deadline = deadline or time.monotonic() + self.unavailable_wait_s
                    if time.monotonic() > deadline:
                        raise
                    log.warning("%s-%d unavailable (%s); asking again once it is back", self.name,
                                k % len(self.actors), str(exc).split(":")[0])
                    time.sleep(1.0)
                    refs[k] = submit(k)
        return results

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


# -- learners ----------------------------------------------------------------------------------------
@ray.remote(num_cpus=0)
class LearnerQueue:
    """The learner jobs of one worker group, in submission order, and their outcomes.

    Ranks wait in :meth:`next_job` until there is a job they have not done; callers wait in
    :meth:`outcome`. A job is finished once, by rank 0's result or by the first rank's error; a
    restarted group (fresh ranks ask from -1) redoes the job in flight and never a finished one.
    """

    def __init__(self):
        self._jobs: list[dict] = []
        self._outcomes: dict[int, tuple] = {}  # seq -> ("ok", [weights ref], stats) | ("error", text)
        self._finished: set[int] = set()
        self._closed = False
        self._ranks_started = False  # a rank has asked for work: the worker group was placed
        self._changed = asyncio.Condition()

    def _first_open(self, after: int) -> int | None:
        return next((seq for seq in range(after + 1, len(self._jobs)) if seq not in self._finished), None)

    async def submit(self, job: dict) -> int:
        async with self._changed:
            self._jobs.append(job)
            self._changed.notify_all()
            return len(self._jobs) - 1

    async def next_job(self, after: int) -> tuple[int, dict] | None:
        """The first unfinished job after ``after``: ``(seq, job)``, or None once the queue is closed."""
        self._ranks_started = True
        async with self._changed:
            await self._changed.wait_for(lambda: self._closed or self._first_open(after) is not None)
            if self._closed:
                return None
            seq = self._first_open(after)
            return seq, self._jobs[seq]

    async def finish(self, seq: int, outcome: tuple) -> None:
        async with self._changed:
            if seq not in self._finished:
                self._finished.add(seq)
                self._outcomes[seq] = outcome
                self._jobs[seq] = None  # a finished job is never handed out again: release its weights and data
                self._changed.notify_all()

    async def outcome(self, seq: int) -> tuple:
        async with self._changed:
            await self._changed.wait_for(lambda: seq in self._outcomes or self._closed)
            return self._outcomes.pop(seq, ("error", "the learner queue was closed before the job finished"))

    async def started(self) -> bool:
        return self._ranks_started

    async def close(self) -> None:
        async with self._changed:
            self._closed = True
            self._changed.notify_all()


def _run_learner_job(job: dict, *, device: str) -> tuple[Any, dict]:
    """One learner phase on this Ray Train rank; returns (rank 0: the weights ref, else None; stats)."""
    import ray.train
    import ray.train.torch


    ctx = ray.train.get_context()
    rank, world_size = ctx.get_world_rank(), ctx.get_world_size()
    spec: LearnerJob = job["spec"]
    init = fetch_weights(job["init"])
    if isinstance(init, PackedWeights):
        # Read-only views of the object-store buffer (one copy per node, mapped by every rank on
        # it): loading them copies each tensor into the model, no full copy per rank on the way.
        init = unpack_state_dict(init)
    data = ray.get(job["data"])

    def prepare(model):  # DDP (the strategy "ddp"); FSDP and DeepSpeed wrap in training.py
        return ray.train.torch.prepare_model(model, move_to_device=device, parallel_strategy="ddp")

    def publish(trained):
        # Rank 0 packs the weights into its buffer as they are gathered and puts them in the
        # object store itself, so it owns the one copy (see the module docstring).
        if rank == 0:
            return put_weights(trained)
        trained.drain()
        return None

    ref, stats = run_job(spec, init, data, device=device, rank=rank, world_size=world_size,
                         prepare_model=prepare, publish=publish)
    del init, data
    pids = [os.getpid()]
    if world_size > 1:
        pids = [None] * world_size
        torch.distributed.all_gather_object(pids, os.getpid())
    stats["worker_pid"] = pids[0]  # the same processes serve every job of a run
    stats["worker_pids"] = pids  # by rank
    return ref, stats


def _is_peer_failure(exc: BaseException) -> bool:
    """Whether ``exc`` comes from a collective whose peer went away (a killed or restarted rank)
    rather than from the job itself: then the job is redone on the restarted group, not failed."""
    text = f"{type(exc).__name__}: {exc}"
    return isinstance(exc, torch.distributed.DistError) or any(
        marker in text for marker in ("Connection closed by peer", "Connection reset by peer", "Broken pipe",
                                      "Socket Timeout", "NCCL communicator was aborted", "ProcessGroupNCCL"))


def _learner_service(config: dict) -> None:
    """Runs on every Ray Train rank for the group's whole life: does the queue's jobs one after
    another until the queue is closed. A failing job is reported and re-raised, so Ray Train
    restarts the group (a rank that failed mid-step may have left the others in a collective);
    a failure of a collective because a peer died is only re-raised, so the restarted group redoes
    the job."""
    import gc
    import traceback

    import ray.train
    import ray.train.torch


    setup_process(config["cpus_per_worker"])
    device = str(ray.train.torch.get_device())
    rank = ray.train.get_context().get_world_rank()
    queue, done = config["queue"][0], -1
    while (item := ray.get(queue.next_job.remote(done))) is not None:
        seq, job = item
        try:
            ref, stats = _run_learner_job(job, device=device)
        except Exception as exc:
            if not _is_peer_failure(exc):
                ray.get(queue.finish.remote(seq, ("error", traceback.format_exc())))
            raise
        if rank == 0:
            ray.get(queue.finish.remote(seq, ("ok", [ref], stats)))  # [ref]: the reference, not the value
        # Hold nothing of a finished job: its input weights and data may be released by the run.
        del ref, item, job
        done = seq
        gc.collect()  # the job's model and optimiser state go before the next job loads its own
        if torch.cuda.is_available():
            torch.cuda.empty_cache()


@ray.remote(num_cpus=0, max_retries=0)
def _serve_learner_group(cfg: Config, queue, name: str, storage_path: str) -> None:
    """The worker group's life: one ``TorchTrainer.fit``, returning when the queue closes. Raises
    Ray Train's error when the group fails more often than ``cluster.max_actor_restarts``."""
    from ray.train import FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    c = cfg.cluster
    resources = ({"CPU": c.learner_cpus} | ({"GPU": c.learner_gpus} if c.learner_use_gpu else {})
                 | dict(c.learner_resources))
    TorchTrainer(
        _learner_service,
        train_loop_config={"queue": [queue], "cpus_per_worker": c.learner_cpus},
        scaling_config=ScalingConfig(num_workers=c.learner_workers, use_gpu=c.learner_use_gpu,
                                     resources_per_worker=resources, placement_strategy=c.learner_placement),
        torch_config=TorchConfig(backend="nccl" if c.learner_use_gpu else "gloo"),
        run_config=RunConfig(name=name, storage_path=storage_path,
                             failure_config=FailureConfig(max_failures=c.max_actor_restarts)),
    ).fit()


def this_node():
    """A scheduling strategy for the node this process runs on (zero-CPU actors and tasks may
    otherwise land on any node, including one that is later lost)."""
    return NodeAffinitySchedulingStrategy(node_id=ray.get_runtime_context().get_node_id(), soft=False)


class LearnerError(RuntimeError):
    """A learner job failed; the message holds the worker's traceback."""


class ResourceWaitError(RuntimeError):
    """The cluster did not free, within ``cluster.resource_wait_s``, what the run's actors need."""


class LearnerGroup:
    """A Ray Train worker group that trains the run's RM and policy jobs in turn.

    Its workers, their process group and their warmed-up kernels outlive a phase (a fresh
    ``TorchTrainer`` per phase costs the worker start-up every phase). A crashed worker is
    restarted by Ray Train (``cluster.max_actor_restarts`` times) and the job in flight is redone.
    """

    def __init__(self, cfg: Config, storage_path: str):
        c = cfg.cluster
        self.name = f"apo-learners-{uuid.uuid4().hex[:8]}"
        self.start_timeout_s = c.resource_wait_s
        self.started = False
        self.demand = (f"cluster.learner_workers={c.learner_workers} x cluster.learner_cpus={c.learner_cpus:g}"
                       + (f" + cluster.learner_gpus={c.learner_gpus:g}" if c.learner_use_gpu else ""))
        # The group's control (this queue, the task running `fit` and with it Ray Train's controller,
        # which Ray Train puts on the node of its caller) stays on the caller's node: a lost worker
        # node then costs only learner workers, which Ray Train restarts, never the queue of jobs.
        here = this_node()
        self.queue = LearnerQueue.options(scheduling_strategy=here).remote()
        self.served = _serve_learner_group.options(scheduling_strategy=here).remote(
            cfg, self.queue, self.name, storage_path)
        self.ended = False

    def run(self, spec: LearnerJob, init: Weights, data_ref) -> tuple[Any, dict]:
        """Train ``spec`` from ``init`` on the examples in ``data_ref``; blocks until the outcome
        (or the group's end): (weights ref owned by rank 0, stats)."""
        seq = ray.get(self.queue.submit.remote({"spec": spec, "init": init, "data": data_ref}))
        outcome = self.queue.outcome.remote(seq)
        if not self.started:  # the group's workers wait for resources: bounded, so a run never hangs
            ready, _ = ray.wait([outcome, self.served], num_returns=1, timeout=self.start_timeout_s)
            self.started = bool(ready) or ray.get(self.queue.started.remote())
            if not self.started:
                self.stop(timeout_s=10.0)
                raise ResourceWaitError(
                    f"the learner group's workers ({self.demand} each) were not placed within "
                    f"cluster.resource_wait_s={self.start_timeout_s:g} s: other jobs or actors hold those "
                    f"resources; wait for them, lower those settings or raise cluster.resource_wait_s")
        ready, _ = ray.wait([outcome, self.served], num_returns=1)
        if outcome not in ready:
            self.ended = True
            try:
                ray.get(self.served)
                reason: BaseException | str = "it returned"
            except Exception as exc:  # noqa: BLE001 - Ray Train's error, handed to the caller
                reason = exc
            raise LearnerError(f"learner group {self.name} stopped before finishing job {seq} "
                               f"({spec.role}): {reason}")
        status, *rest = ray.get(outcome)
        if status == "error":
            raise LearnerError(f"learner job {seq} ({spec.role}) failed:\n{rest[0]}")
        [ref], stats = rest
        return ref, stats

    def stop(self, timeout_s: float = 120.0) -> None:
        """Close the queue (the ranks return, ``fit`` ends); force the task down if it does not."""
        if not self.ended:
            ray.get(self.queue.close.remote())
            try:
                ray.get(self.served, timeout=timeout_s)
            except ray.exceptions.GetTimeoutError:
                log.warning("learner group %s did not stop within %.0f s; cancelling it", self.name, timeout_s)
                ray.cancel(self.served, force=True)
            except Exception as exc:  # noqa: BLE001 - it failed earlier; nothing left to stop
                log.warning("learner group %s ended with %r", self.name, exc)
            self.ended = True
        ray.kill(self.queue)


class RaySystem:
    """GameSystem on Ray: sharded generator and scorer pools, one learner group per run."""

    def __init__(self, cfg: Config, *, namespace: str | None = None, storage_path: str | None = None):
        c = cfg.cluster
        self.cfg = cfg
        # Ray Train keeps only its own run state there (no checkpoints are reported to it), read by
        # its controller on this node: beside a URI output_dir it stays on this node's disk.
        out = cfg.run.output_dir
        self.storage_path = storage_path or (str(Path(tempfile.gettempdir()) / "apo_ray_train") if is_uri(out)
                                             else str(join(out, "ray_train")))
        self.generators = ShardedPool(GeneratorActor, cfg, c.num_generators, cpus=c.generator_cpus,
                                      gpus=c.generator_gpus, name="apo-generator", namespace=namespace,
                                      max_restarts=c.max_actor_restarts, resources=c.generator_resources,
                                      unavailable_wait_s=c.resource_wait_s)
        self.scorers = ShardedPool(ScorerActor, cfg, c.num_scorers, cpus=c.scorer_cpus, gpus=c.scorer_gpus,
                                   name="apo-scorer", namespace=namespace, max_restarts=c.max_actor_restarts,
                                   resources=c.scorer_resources, unavailable_wait_s=c.resource_wait_s)
        self.learners: LearnerGroup | None = None

    # -- pools -------------------------------------------------------------------------------------
    def generate(self, policy: Weights, prompts: list[str], n: int, seed: int,
                 decoding: DecodingConfig | None = None) -> Generated:
        """Batches of ``generation.prompts_per_batch`` prompts, one call each, seeded by their batch
        number (:func:`apo_ray.game.system.batch_seed`): the same samples however many generators there are."""
        start = time.perf_counter()
        batches, calls = generate_calls(prompts, n, seed, decoding, self.cfg.generation.prompts_per_batch)
        parts = self.generators.call_all("generate", [(policy, *call) for call in calls])
        return merge_generated(batches, parts, time.perf_counter() - start)

    def score(self, rm: Weights, prompts: list[str], responses: list[str]) -> list[float]:
        batches, calls = score_calls(prompts, responses, self.cfg.rm.score_batch)
        return in_input_order(batches, self.scorers.call_all("score", [(rm, *call) for call in calls]))

    # -- learners ----------------------------------------------------------------------------------
    def train(self, job: LearnerJob, init: Weights, data: list) -> tuple[Any, dict]:
        if self.learners is None or self.learners.ended:
            # One worker group for the whole run (started at the first learner phase, so a resumed
            # run whose learner phases are all done never starts one).
            self.learners = LearnerGroup(self.cfg, self.storage_path)
        start = time.perf_counter()
        ref, stats = self.learners.run(job, init, ray.put(data))
        stats["fit_seconds"] = time.perf_counter() - start
        return ref, stats

    # -- checkpoints (disk is for resume only) -----------------------------------------------------
    def save_weights(self, handle: Any, path: Path, **checkpoint) -> None:
        """Zero-copy views of the object-store buffer; only the tensors the checkpoint keeps (what
        the phase trained, ``checkpoint``: see :func:`apo_ray.game.store.write_checkpoint`) are copied."""
        write_checkpoint(path, unpack_state_dict(ray.get(handle)), **checkpoint)

    def load_weights(self, path: Path) -> Any:
        return ray.put(pack_state_dict(load_checkpoint(path)))

    def resource_usage(self) -> dict[str, float]:
        """The cluster's object-store bytes and objects now (:func:`apo_ray.runtime.telemetry.object_store_usage`)."""

        return object_store_usage()

    def shutdown(self) -> None:
        if self.learners is not None:
            self.learners.stop()
        self.generators.kill()
        self.scorers.kill()
