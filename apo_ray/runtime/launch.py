"""Start-up shared by the entry points: connect to (or start) Ray, validate against what the cluster
can offer, run the driver actor, tear everything down so Hydra multirun points don't leak actors."""

from __future__ import annotations

import contextlib
import hashlib
import logging
import math
import os
import time
from pathlib import Path

from apo_ray.config import Config, ConfigError, resource_demand, total_demand, validate
from apo_ray.core.arms import judge_baseline
from apo_ray.data import DataError
from apo_ray.game.game_data import GameData, build_game_data, eval_prompts
from apo_ray.game.ownership import claim_output_dir
from apo_ray.game.store import PhaseStore, ResumeError, check_store
from apo_ray.llm_api.judge import JudgeClient, JudgeError, summarize_records
from apo_ray.llm_api.server import start_server, stop_server
from apo_ray.models.memory import check_memory
from apo_ray.outputs.report import write_report
from apo_ray.outputs.tracking import require_tracker
from apo_ray.runtime.driver import DRIVER_NAME, APODriver
from apo_ray.runtime.in_process import InProcessSystem
from apo_ray.runtime.play import play_game
from apo_ray.runtime.ray_system import ResourceWaitError
from apo_ray.storage import is_uri

log = logging.getLogger(__name__)


class ClusterConnectError(ConnectionError):
    """The Ray cluster that was asked for cannot be joined; the message names the address and the fix."""


# Errors in what the user asked for (config, data, output folder, cluster, endpoint): the entry points
# print their message, which names the field, file or resource, instead of a traceback.
USER_ERRORS = (ConfigError, DataError, ResumeError, ResourceWaitError, JudgeError, ClusterConnectError)


def ray_target(cfg: Config) -> str | None:
    """The existing cluster this run joins, or None for a private local instance: ``cluster.address``
    when given (``auto`` only when asked for: it joins whatever cluster ``ray start`` left on this
    machine, possibly another user's), else ``$RAY_ADDRESS`` (how ``ray job submit`` points a job at
    its cluster). ``cluster.address=local`` is a private instance too."""
    address = cfg.cluster.address or os.environ.get("RAY_ADDRESS") or None
    return None if address in (None, "", "local") else address


def probe_ray(address: str, timeout_s: float) -> None:
    """Connect to ``address`` in a child process, bounded by ``timeout_s``: ``ray.init`` against an
    unreachable head, or one whose token auth refuses us, retries for minutes in-process. Raises
    :class:`ClusterConnectError` naming the address, the cause and the fix."""
    import socket
    import subprocess
    import sys

    host, _, port = address.rpartition(":")
    if host and port.isdigit() and "/" not in address:  # a GCS host:port: a refused connection says so at once
        try:
            socket.create_connection((host, int(port)), timeout=min(5.0, timeout_s)).close()
        except OSError as exc:
            raise ClusterConnectError(f"could not join the Ray cluster at {address!r}: "
                                      f"{exc.strerror or exc} (no Ray head listens there). {_CONNECT_FIX}") from None
    code = ("import sys, ray; ray.init(address=sys.argv[1], log_to_driver=False, logging_level='ERROR'); "
            "ray.shutdown()")
    try:
        done = subprocess.run([sys.executable, "-c", code, address], capture_output=True, text=True,
                              timeout=timeout_s, env=os.environ.copy(), check=False)
    except subprocess.TimeoutExpired as exc:
        said = exc.stderr.decode(errors="replace") if isinstance(exc.stderr, bytes) else (exc.stderr or "")
        auth = any(word in said.lower() for word in ("auth", "token", "unauthenticated"))
        why = ("it refuses this client's authentication token: set RAY_AUTH_TOKEN to that cluster's token"
               if auth else "it is unreachable, or refuses this client (a cluster with token authentication "
               "needs RAY_AUTH_TOKEN set to its token)")
        raise ClusterConnectError(
            f"could not join the Ray cluster at {address!r} within {timeout_s:g} s (cluster.connect_timeout_s): "
            f"{why}. {_CONNECT_FIX}") from None
    if done.returncode != 0:
        lines = [ln for ln in (done.stderr or "").strip().splitlines() if ln.strip()]
        raise ClusterConnectError(f"could not join the Ray cluster at {address!r}: "
                                  f"{lines[-1] if lines else f'exit status {done.returncode}'}. {_CONNECT_FIX}")


_CONNECT_FIX = ("Check cluster.address / $RAY_ADDRESS, or leave both unset (and cluster.address unset or "
                "'local') to run on a private local Ray instance")


def connect_ray(cfg: Config) -> bool:
    """Join the cluster :func:`ray_target` names (checked first, within ``cluster.connect_timeout_s``),
    or start a private local instance: never a stranger's cluster found on this machine. Returns True
    when this call connected (and so must shut Ray down)."""
    import ray

    if ray.is_initialized():
        return False
    address = ray_target(cfg)
    if address is None:
        ray.init(address="local", num_cpus=local_instance_cpus(cfg), log_to_driver=True)
        return True
    probe_ray(address, cfg.cluster.connect_timeout_s)
    ray.init(address=address, log_to_driver=True)
    return True


def local_instance_cpus(cfg: Config) -> int:
    """Logical CPUs of a Ray instance apo_ray starts itself (``cluster.address=local``, or no
    cluster to join): ``cluster.local_num_cpus`` when set, else enough for every actor the run holds
    at once (:func:`apo_ray.config.total_demand`, rounded up) and at least this machine's cores.

    Ray's CPU count is a logical scheduling unit, not a core: a 2-core machine may hold the demo's
    6 CPUs of actors (they mostly wait on each other; each sets its torch threads from its share).
    A cluster that is joined is not resized: :func:`run_on_ray` validates the run against what it
    offers."""
    if cfg.cluster.local_num_cpus:
        return int(cfg.cluster.local_num_cpus)
    need = math.ceil(total_demand(cfg).get("CPU", 0.0) - 1e-9)
    return max(need, os.cpu_count() or 1)


def run_namespace(cfg: Config) -> str:
    if cfg.cluster.namespace:
        return cfg.cluster.namespace
    out = cfg.run.output_dir
    where = out if is_uri(out) else str(Path(out).resolve())
    digest = hashlib.sha1(where.encode()).hexdigest()[:8]
    return f"apo-{cfg.run.name}-{digest}"


def hydra_own_names(cfg: Config) -> set[str]:
    """What Hydra itself put into ``run.output_dir`` for this job: its ``.hydra/`` settings and the
    job's log when ``run.output_dir`` is Hydra's own output folder, or the folder Hydra made inside
    it (``hydra.run.dir`` is ``outputs/<run.name>/<time>``, so the README's ``run.output_dir=$PWD/
    outputs/demo`` holds Hydra's ``<time>/``). Such a folder is still new to the run."""
    try:
        from hydra.core.hydra_config import HydraConfig

        if not HydraConfig.initialized():
            return set()
        hc = HydraConfig.get()
        hydra_dir, out = Path(hc.runtime.output_dir).resolve(), Path(cfg.run.output_dir).resolve()
        if hydra_dir == out:
            return {hc.output_subdir or ".hydra", f"{hc.job.name}.log"}
        if out in hydra_dir.parents:
            return {hydra_dir.relative_to(out).parts[0]}
        return set()
    except Exception:  # noqa: BLE001 - no Hydra app here: nothing is Hydra's
        return set()


def claim(cfg: Config):
    """:func:`apo_ray.game.ownership.claim_output_dir` for ``run.output_dir``: this run's own folder
    (new, empty or an earlier run's), locked against a second run while the block runs. A URI
    (``s3://...``) is not claimed: an object store has no lock file two clients can take atomically
    here, so keeping two runs apart there is the user's (the phase store still refuses a fresh run
    into a folder that holds phases)."""
    if is_uri(cfg.run.output_dir):
        log.warning("run.output_dir=%s is a URI: no ownership marker or lock (local folders only)",
                    cfg.run.output_dir)
        return contextlib.nullcontext(cfg.run.output_dir)
    return claim_output_dir(cfg.run.output_dir, ignore=hydra_own_names(cfg))


def run_on_ray(cfg: Config) -> list[dict]:
    check_memory(cfg)  # a generate call larger than this machine (where the head and CPU actors run)
    with claim(cfg):  # refused or locked before Ray starts
        return _run_on_ray(cfg)


def _run_on_ray(cfg: Config) -> list[dict]:
    import ray


    started = connect_ray(cfg)
    try:
        resources = ray.cluster_resources()
        nodes = [node["Resources"] for node in ray.nodes() if node.get("Alive")]
        validate(cfg, cluster_cpus=resources.get("CPU", 0.0), cluster_gpus=resources.get("GPU", 0.0),
                 node_resources=nodes)
        require_extras(cfg)  # here, not in the driver actor: a clean error before any actor starts
        data = preflight(cfg)  # built once here; the driver plays on it and the judge reads its prompts
        wait_for_resources(cfg, cfg.cluster.resource_wait_s)
        namespace = run_namespace(cfg)
        # Without custom resources the driver stays on this node if it can (the head, for a submitted
        # job): a zero-CPU actor could otherwise land on a worker node and be lost with it.
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        placement = None if cfg.cluster.driver_resources else NodeAffinitySchedulingStrategy(
            node_id=ray.get_runtime_context().get_node_id(), soft=True)
        driver = ray.remote(APODriver).options(  # two threads: status() answers while run() plays
            name=DRIVER_NAME, namespace=namespace, num_cpus=cfg.cluster.driver_cpus, max_concurrency=2,
            resources=dict(cfg.cluster.driver_resources), scheduling_strategy=placement,
        ).remote(cfg, namespace, data)
        log.info("driver actor %s in namespace %s; output in %s", DRIVER_NAME, namespace, cfg.run.output_dir)
        try:
            records = ray.get(driver.run.remote())
        except ray.exceptions.RayTaskError as err:
            # its message says it all (an OSError: its cause and path); the remote traceback would bury it
            if isinstance(err.cause, (*USER_ERRORS, OSError)):
                raise err.cause from None
            raise
        finally:
            ray.kill(driver)
        if cfg.eval.judge:
            judge_final_policies(cfg, records, data)
        return records
    finally:
        if started:
            ray.shutdown()


def preflight(cfg: Config) -> GameData:
    """What can be refused before any actor starts: the data and its splits (a ConfigError or
    DataError naming the field or file) and the output folder (a ResumeError)."""

    data = build_game_data(cfg)
    check_store(cfg)
    return data


def wait_for_resources(cfg: Config, timeout_s: float) -> None:
    """Wait until the cluster can hold every actor of the run at once (the pools, the learner workers
    and the driver live together); after ``timeout_s`` raise :class:`ResourceWaitError` naming what
    is missing. Without this, an actor that never fits (other jobs hold the resources) waits forever.

    The probe is a placement group with one bundle per actor (``PACK``: bundles may still spread over
    nodes), removed as soon as Ray grants it: Ray grants it only when all bundles fit at the same time.
    """
    import ray
    from ray.util.placement_group import placement_group, remove_placement_group

    bundles = [actor.each for actor in resource_demand(cfg) for _ in range(actor.count) if actor.each]
    if not bundles:
        return
    start = time.monotonic()
    probe = placement_group(bundles, strategy="PACK")
    try:
        ready = probe.wait(timeout_seconds=timeout_s)
    finally:
        remove_placement_group(probe)
    if ready:
        log.info("cluster resources for %d actors free after %.1f s", len(bundles), time.monotonic() - start)
        return
    need, free, total = total_demand(cfg), ray.available_resources(), ray.cluster_resources()
    short = [f"{k}: needs {v:g}, {free.get(k, 0.0):g} of {total.get(k, 0.0):g} free" for k, v in need.items()
             if v > free.get(k, 0.0) + 1e-9]
    layout = "; ".join(f"{k}: " + " + ".join(a.describe(k) for a in resource_demand(cfg) if k in a.each)
                       for k in need)
    raise ResourceWaitError(
        f"waited {timeout_s:g} s (cluster.resource_wait_s) for the Ray cluster to free what this run's actors "
        f"need at once ({layout}); still missing: "
        f"{'; '.join(short) or 'enough on any one node (the free resources are split across nodes)'}. "
        f"Other jobs or actors hold them: wait for them, lower those cluster.* settings, or raise "
        f"cluster.resource_wait_s")


def require_extras(cfg: Config) -> None:
    """The optional packages the run asks for: each tracker of ``run.tracking``, and
    DeepSpeed for ``cluster.learner_strategy=deepspeed`` (on Ray); an error names the extra to install."""
    import importlib.util


    for name in cfg.run.tracking:
        require_tracker(name)
    if cfg.cluster.learner_strategy == "deepspeed" and not cfg.run.in_process \
            and importlib.util.find_spec("deepspeed") is None:
        raise ConfigError("cluster.learner_strategy=deepspeed needs DeepSpeed, which is not installed: "
                          "pip install 'apo-ray[deepspeed]' (tested with deepspeed==0.19.8), or choose "
                          "cluster.learner_strategy=fsdp (PyTorch's own sharding)")


def run_in_process(cfg: Config) -> list[dict]:
    validate(cfg)
    check_memory(cfg)
    require_extras(cfg)
    with claim(cfg):
        data = build_game_data(cfg)
        records = play_game(cfg, InProcessSystem(cfg), data=data)  # no model is loaded before the data checks pass
        if cfg.eval.judge:
            judge_final_policies(cfg, records, data)
    return records


def judge_final_policies(cfg: Config, records: list[dict], data: GameData | None = None) -> dict:
    """The paper's GPT-4 comparison: each arm's last policy against the judge's baseline arm's
    (``arms.judge_baseline``: RJS) on the same test prompts, asked twice with positions swapped.
    Writes ``judge/<arm>.jsonl`` and ``judge_summary.json`` and adds the judge table and figure to
    the report."""
    import json


    out = Path(cfg.run.output_dir)
    baseline = judge_baseline()
    last = {r["rm_mode"]: r for r in records if r["round"] == cfg.apo.rounds}
    if baseline.name not in last or len(last) < 2:
        log.warning("eval.judge needs the %s arm (the judge's baseline) and another arm; skipped", baseline.name)
        return {}
    store = PhaseStore(out / "phases", system=None)

    def answers(policy_id: str) -> list[str]:
        stored = store.get(f"samples/{policy_id}/test")
        if stored is None:
            raise ResumeError(f"{store.root}: no readable test answers of {policy_id} to judge; rerun with "
                              f"run.resume=true to compute them again")
        return [a[0] for a in stored]

    data = data if data is not None else build_game_data(cfg)
    prompts = eval_prompts(cfg, data)[: cfg.eval.judge_pairs]
    base_url, served = cfg.eval.judge_base_url, None
    if not base_url:

        # Its own Serve application under a unique name and route, deleted afterwards: a user's
        # Serve apps on the same cluster are left alone.
        served = start_server(cfg.eval.judge_model, port=_free_port())
        base_url = served.base_url
    judge = JudgeClient(base_url, cfg.eval.judge_model, concurrency=cfg.eval.judge_concurrency,
                        max_tokens=cfg.eval.judge_max_tokens, cache_path=out / "judge" / "cache.jsonl",
                        max_failed_fraction=cfg.eval.judge_max_failed_fraction)
    theirs = answers(last[baseline.name]["policy"])[: len(prompts)]
    summaries = {}
    try:
        for arm, record in last.items():
            if arm == baseline.name:
                continue
            failure = None
            try:
                judged = judge.judge_pairs(prompts, answers(record["policy"])[: len(prompts)], theirs)
            except JudgeError as err:  # keep what was asked (failed requests are not cached: a rerun asks them)
                failure, judged = err, err.records
            (out / "judge").mkdir(exist_ok=True)
            (out / "judge" / f"{arm}.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judged))
            if failure is not None:
                raise JudgeError(f"eval.judge, arm {arm}: {failure} (eval.judge_base_url / "
                                 f"eval.judge_max_failed_fraction)", judged)
            summaries[arm] = summarize_records(judged)
    finally:
        if served is not None:

            stop_server(served.app_name)
    (out / "judge_summary.json").write_text(json.dumps(summaries, indent=2))
    where = f"a local Ray Serve server ({served.backend})" if served is not None else base_url
    previous = out / "report.json"
    notes = json.loads(previous.read_text()).get("notes", []) if previous.exists() else []
    notes.append(f"Judge: `{cfg.eval.judge_model}` at {where}, {len(prompts)} test prompts per arm, each asked "
                 f"twice with positions swapped.")
    write_report(out, records, judge=summaries, title=f"APO run `{cfg.run.name}`", notes=notes,
                 judge_baseline=baseline.label)
    return summaries


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
