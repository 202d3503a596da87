"""Start-up shared by the entry points: connect to (or start) Ray, validate against what the cluster
can offer, run the driver actor, tear everything down so Hydra multirun points don't leak actors."""

from __future__ import annotations

import hashlib
import logging
import os
import time
from pathlib import Path

from apo_ray.config import Config, validate

log = logging.getLogger(__name__)


def connect_ray(cfg: Config) -> bool:
    """Connect to ``cluster.address``, to the cluster of a submitted job (``RAY_ADDRESS``), or to a
    cluster started with ``ray start`` on this machine; else start a local instance. Returns True
    when this call started Ray (and so must shut it down)."""
    import ray

    if ray.is_initialized():
        return False
    if cfg.cluster.address or os.environ.get("RAY_ADDRESS"):
        ray.init(address=cfg.cluster.address, log_to_driver=True)
        return True
    try:
        ray.init(address="auto", log_to_driver=True)
    except ConnectionError:
        ray.init(num_cpus=cfg.cluster.local_num_cpus, log_to_driver=True)
    return True


def run_namespace(cfg: Config) -> str:
    if cfg.cluster.namespace:
        return cfg.cluster.namespace
    digest = hashlib.sha1(str(Path(cfg.run.output_dir).resolve()).encode()).hexdigest()[:8]
    return f"apo-{cfg.run.name}-{digest}"


def run_on_ray(cfg: Config) -> list[dict]:
    import ray

    from apo_ray.driver import DRIVER_NAME, APODriver

    started = connect_ray(cfg)
    try:
        resources = ray.cluster_resources()
        validate(cfg, cluster_cpus=resources.get("CPU", 0.0), cluster_gpus=resources.get("GPU", 0.0))
        namespace = run_namespace(cfg)
        driver = ray.remote(APODriver).options(
            name=DRIVER_NAME, namespace=namespace, num_cpus=cfg.cluster.driver_cpus, max_concurrency=8,
        ).remote(cfg, namespace)
        log.info("driver actor %s in namespace %s; output in %s", DRIVER_NAME, namespace, cfg.run.output_dir)
        try:
            records = ray.get(driver.run.remote())
        finally:
            ray.kill(driver)
        if cfg.eval.judge:
            judge_final_policies(cfg, records)
        return records
    finally:
        if started:
            ray.shutdown()


def run_in_process(cfg: Config) -> list[dict]:
    from apo_ray.game import APOGame, build_game_data, finish_run, open_store
    from apo_ray.local import LocalSystem

    validate(cfg)
    start = time.perf_counter()
    system = LocalSystem(cfg)
    game = APOGame(cfg, system, build_game_data(cfg), open_store(cfg, system))
    records = game.run()
    finish_run(cfg, game, records, wall_seconds=time.perf_counter() - start)
    if cfg.eval.judge:
        judge_final_policies(cfg, records)
    return records


def judge_final_policies(cfg: Config, records: list[dict]) -> dict:
    """The paper's GPT-4 comparison: each arm's last policy against the fixed arm's (RJS) on the same
    test prompts, asked twice with positions swapped. Writes ``judge/<arm>.jsonl`` and
    ``judge_summary.json`` and adds the judge table and figure to the report."""
    import json

    from apo_ray.game import PhaseStore, build_game_data, eval_prompts
    from apo_ray.judge import JudgeClient, summarize_records
    from apo_ray.report import write_report

    out = Path(cfg.run.output_dir)
    last = {r["rm_mode"]: r for r in records if r["round"] == cfg.apo.rounds}
    if "fixed" not in last or len(last) < 2:
        log.warning("eval.judge needs the fixed arm and another arm; skipped")
        return {}
    store = PhaseStore(out / "phases", system=None)

    def answers(policy_id: str) -> list[str]:
        return [a[0] for a in store.get(f"samples/{policy_id}/test")]

    data = build_game_data(cfg)
    prompts = eval_prompts(cfg, data)[: cfg.eval.judge_pairs]
    base_url, served = cfg.eval.judge_base_url, None
    if not base_url:
        from apo_ray.serve import start_server

        # Its own Serve application under a unique name and route, deleted afterwards: a user's
        # Serve apps on the same cluster are left alone.
        served = start_server(cfg.eval.judge_model, port=_free_port())
        base_url = served.base_url
    judge = JudgeClient(base_url, cfg.eval.judge_model, concurrency=cfg.eval.judge_concurrency,
                        max_tokens=cfg.eval.judge_max_tokens, cache_path=out / "judge" / "cache.jsonl")
    theirs = answers(last["fixed"]["policy"])[: len(prompts)]
    summaries = {}
    try:
        for arm, record in last.items():
            if arm == "fixed":
                continue
            judged = judge.judge_pairs(prompts, answers(record["policy"])[: len(prompts)], theirs)
            (out / "judge").mkdir(exist_ok=True)
            (out / "judge" / f"{arm}.jsonl").write_text("".join(json.dumps(j) + "\n" for j in judged))
            summaries[arm] = summarize_records(judged)
    finally:
        if served is not None:
            from apo_ray.serve import stop_server

            stop_server(served.app_name)
    (out / "judge_summary.json").write_text(json.dumps(summaries, indent=2))
    where = f"a local Ray Serve server ({served.backend})" if served is not None else base_url
    previous = out / "report.json"
    notes = json.loads(previous.read_text()).get("notes", []) if previous.exists() else []
    notes.append(f"Judge: `{cfg.eval.judge_model}` at {where}, {len(prompts)} test prompts per arm, each asked "
                 f"twice with positions swapped.")
    write_report(out, records, judge=summaries, title=f"APO run `{cfg.run.name}`", notes=notes)
    return summaries


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
