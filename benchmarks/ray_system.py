"""The Ray layer on this machine: generation samples/s with 1 vs 2 generator actors (same prompts,
same run); learner phases on one long-lived worker group, the first (which starts the group) vs
the next ones (same job, same run); and wall time per phase of one `smoke` round on a local Ray
instance.

    python benchmarks/ray_system.py --data ../shared/data/hh-rlhf --out benchmarks/results/ray_system_cpu.json
"""

import argparse
import json
import platform
import tempfile
import time
from pathlib import Path

import ray

from apo_ray.config import Config, from_omegaconf
from apo_ray.data import load_preference_pairs
from apo_ray.game import Weights
from apo_ray.ray_system import RaySystem


def pool_scaling(data: str, model: str, prompts_n: int, samples: int, new_tokens: int) -> list[dict]:
    prompts = [p.prompt for p in load_preference_pairs(data, limit=prompts_n)]
    rows = []
    for actors in (1, 2):
        cfg = Config()
        cfg.model.policy = cfg.model.reward = model
        cfg.generation.sampling.max_new_tokens = new_tokens
        cfg.generation.prompts_per_batch = 8
        cfg.cluster.num_generators, cfg.cluster.generator_cpus, cfg.cluster.scorer_cpus = actors, 1.0, 0.0
        system = RaySystem(cfg, mailbox=None, namespace=f"bench-{actors}")
        system.generate(Weights("policy/init"), prompts[:2], 1, seed=0)  # warm: models loaded in every actor
        start = time.perf_counter()
        system.generate(Weights("policy/init"), prompts, samples, seed=1)
        seconds = time.perf_counter() - start
        g = system.last_generation
        rows.append({"generator_actors": actors, "sequences": g["sequences"], "seconds": seconds,
                     "samples_per_s": g["sequences"] / seconds, "tokens_per_s": g["new_tokens"] / seconds})
        system.shutdown()
    for r in rows:
        r["speedup_vs_1"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def learner_phases(data: str, model: str, pairs_n: int, jobs: int) -> list[dict]:
    """The same RM job ``jobs`` times on one RaySystem: the first pays the worker group's start-up
    (what every phase paid when each phase was its own TorchTrainer), the rest reuse the group."""
    from apo_ray.ray_system import LearnerMailbox
    from apo_ray.training import RankedPair

    cfg = Config()
    cfg.model.policy = cfg.model.reward = model
    cfg.model.train_precision = "fp32"
    cfg.rm.pairs_per_batch, cfg.rm.micro_pairs, cfg.rm.max_length = 8, 8, 96
    cfg.cluster.generator_cpus = cfg.cluster.scorer_cpus = 0.0
    cfg.run.output_dir = tempfile.mkdtemp(prefix="apo-bench-learners-")
    mailbox = ray.remote(LearnerMailbox).options(max_concurrency=8).remote()
    system = RaySystem(cfg, mailbox, namespace="bench-learners")
    pairs = [RankedPair(p.prompt, p.chosen, p.rejected) for p in load_preference_pairs(data, limit=pairs_n)]
    rows = []
    for job in range(jobs):
        _, stats = system.train_rm(Weights("rm/pretrained"), pairs, lr=1e-4, epochs=1, beta2=1.0, apo_weight=0.0,
                                   seed=0)
        rows.append({"job": job, "phase_s": stats["fit_seconds"], "train_s": stats["seconds"],
                     "worker_pid": stats["worker_pid"]})
    system.shutdown()
    warm = sorted(r["phase_s"] for r in rows[1:])[len(rows[1:]) // 2]
    for r in rows:
        r["vs_warm_median"] = r["phase_s"] / warm
    return rows


def smoke_round(data: str) -> dict:
    from hydra import compose, initialize_config_dir

    from apo_ray.config import register_configs
    from apo_ray.launch import run_on_ray

    register_configs()
    out = tempfile.mkdtemp(prefix="apo-bench-")
    with initialize_config_dir(str(Path(__file__).resolve().parents[1] / "conf"), version_base="1.3"):
        node = compose("config", overrides=["experiment=smoke", "apo.rounds=1", f"data.path={data}",
                                            f"run.output_dir={out}"])
    cfg: Config = from_omegaconf(node)
    start = time.perf_counter()
    records = run_on_ray(cfg)
    return {"wall_s": time.perf_counter() - start, "phase_seconds": records[-1]["phase_seconds"],
            "setup_seconds": records[0]["phase_seconds"]}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="../shared/data/hh-rlhf")
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--learner-jobs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/ray_system_cpu.json")
    args = ap.parse_args()
    data = str(Path(args.data).resolve())
    ray.init(num_cpus=4, include_dashboard=False)
    scaling = pool_scaling(data, args.model, args.prompts, args.samples, args.new_tokens)
    learners = learner_phases(data, args.model, 16, args.learner_jobs)
    ray.shutdown()
    print(f"\ngeneration, {args.model}, {args.prompts} prompts x {args.samples} samples x {args.new_tokens} tokens")
    print(f"{'actors':>6} {'seconds':>8} {'samples/s':>10} {'tokens/s':>9} {'speedup':>8}")
    for r in scaling:
        print(f"{r['generator_actors']:>6} {r['seconds']:>8.2f} {r['samples_per_s']:>10.1f} {r['tokens_per_s']:>9.0f} "
              f"{r['speedup_vs_1']:>7.2f}x")
    print(f"\nlearner phases on one worker group, {args.model}, the same 16-pair RM job each time")
    print(f"{'job':>4} {'phase s':>8} {'train s':>8} {'x warm':>7} {'worker pid':>10}")
    for r in learners:
        print(f"{r['job']:>4} {r['phase_s']:>8.2f} {r['train_s']:>8.2f} {r['vs_warm_median']:>6.2f}x {r['worker_pid']:>10}")
    smoke = smoke_round(data)
    print(f"\nsmoke round on local Ray: {smoke['wall_s']:.1f} s wall (including Ray start and RM_Base)")
    for phase, seconds in {**smoke["setup_seconds"], **smoke["phase_seconds"]}.items():
        print(f"  {phase:<16} {seconds:>7.2f} s")
    result = {"benchmark": "ray_system", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": __import__("os").cpu_count(), "model": args.model, "pool_scaling": scaling,
              "learner_phases": learners, "smoke_round": smoke}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
