"""The Ray layer on this machine: generation samples/s with 1 vs 2 generator actors (same prompts,
same run); learner phases on one long-lived worker group, the first (which starts the group) vs
the next ones (same job, same run); and wall time per phase of one `smoke` round on a local Ray
instance.

With ``--baseline-ref REF`` the same script of an earlier commit runs first, from a temporary git
worktree of REF, and its learner-phase and smoke-round numbers are printed beside this code's
(same machine, same run; give ``--data`` a file path then: older commits may not know the
embedded data set).

    python benchmarks/ray_system.py --out benchmarks/results/ray_system_cpu.json
    python benchmarks/ray_system.py --baseline-ref dbe7071 --data ../shared/data/hh-rlhf \
        --out benchmarks/results/ray_system_vs_dbe7071.json
"""

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import ray
from results_io import run_at_ref

from apo_ray.config import Config, from_omegaconf
from apo_ray.data import RankedPair, load_preference_pairs
from apo_ray.game.system import Weights
from apo_ray.models.training import LearnerJob, RMLoss
from apo_ray.runtime.ray_system import RaySystem

ROOT = Path(__file__).resolve().parents[1]


def pool_scaling(data: str, model: str, prompts_n: int, samples: int, new_tokens: int) -> list[dict]:
    prompts = [p.prompt for p in load_preference_pairs(data, limit=prompts_n)]
    rows = []
    for actors in (1, 2):
        cfg = Config()
        cfg.model.policy = cfg.model.reward = model
        cfg.generation.sampling.max_new_tokens = new_tokens
        cfg.generation.prompts_per_batch = 8
        cfg.cluster.num_generators, cfg.cluster.generator_cpus, cfg.cluster.scorer_cpus = actors, 1.0, 0.0
        system = RaySystem(cfg, namespace=f"bench-{actors}")
        system.generate(Weights("policy/init"), prompts[:2], 1, seed=0)  # warm: models loaded in every actor
        start = time.perf_counter()
        g = system.generate(Weights("policy/init"), prompts, samples, seed=1).stats
        seconds = time.perf_counter() - start
        rows.append({"generator_actors": actors, "sequences": g["sequences"], "seconds": seconds,
                     "samples_per_s": g["sequences"] / seconds, "tokens_per_s": g["new_tokens"] / seconds})
        system.shutdown()
    for r in rows:
        r["speedup_vs_1"] = r["samples_per_s"] / rows[0]["samples_per_s"]
    return rows


def learner_phases(data: str, model: str, pairs_n: int, jobs: int) -> list[dict]:
    """The same RM job ``jobs`` times on one RaySystem: the first pays the worker group's start-up
    (what every phase paid when each phase was its own TorchTrainer), the rest reuse the group.
    ``overhead_s``: the phase's wall time less the training loop's own seconds."""
    cfg = Config()
    cfg.model.policy = cfg.model.reward = model
    cfg.model.train_precision = "fp32"
    cfg.rm.pairs_per_batch, cfg.rm.micro_pairs, cfg.rm.max_length = 8, 8, 96
    cfg.cluster.generator_cpus = cfg.cluster.scorer_cpus = 0.0
    cfg.run.output_dir = tempfile.mkdtemp(prefix="apo-bench-learners-")
    system = RaySystem(cfg, namespace="bench-learners")
    pairs = [RankedPair.from_preference(p) for p in load_preference_pairs(data, limit=pairs_n)]
    rows = []
    for job in range(jobs):
        spec = LearnerJob.rm(cfg, lr=1e-4, epochs=1, seed=0, loss=RMLoss())
        _, stats = system.train(spec, Weights("rm/pretrained"), pairs)
        rows.append({"job": job, "phase_s": stats["fit_seconds"], "train_s": stats["seconds"],
                     "overhead_s": stats["fit_seconds"] - stats["seconds"], "worker_pid": stats["worker_pid"]})
    system.shutdown()
    warm = sorted(r["phase_s"] for r in rows[1:])[len(rows[1:]) // 2]
    for r in rows:
        r["vs_warm_median"] = r["phase_s"] / warm
    return rows


def smoke_round(data: str) -> dict:
    from hydra import compose, initialize_config_dir

    from apo_ray.config import register_configs
    from apo_ray.runtime.launch import run_on_ray

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


def run_baseline(ref: str, args: argparse.Namespace) -> dict:
    """This script as it was at git ``ref``, run from a temporary worktree of that commit."""
    return run_at_ref(ref, "benchmarks/ray_system.py", [
        "--data", args.data, "--model", args.model, "--prompts", str(args.prompts), "--samples", str(args.samples),
        "--new-tokens", str(args.new_tokens), "--learner-jobs", str(args.learner_jobs)])


def _warm(rows: list[dict], key: str) -> float:
    """Median of ``key`` over the jobs after the first (the group is running)."""
    values = sorted(r[key] for r in rows[1:])
    return values[len(values) // 2]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="embedded:hh-rlhf-harmless-test")
    ap.add_argument("--model", default="tiny-random-llama")
    ap.add_argument("--prompts", type=int, default=32)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=32)
    ap.add_argument("--learner-jobs", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/ray_system_cpu.json")
    ap.add_argument("--baseline-ref", default=None, help="git ref whose version of this script runs first")
    args = ap.parse_args()
    if Path(args.data).exists():  # a file path (the baseline's process runs in another directory)
        args.data = str(Path(args.data).resolve())
    data = args.data
    baseline = run_baseline(args.baseline_ref, args) if args.baseline_ref else None
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
    print(f"{'job':>4} {'phase s':>8} {'train s':>8} {'overhead s':>10} {'x warm':>7} {'worker pid':>10}")
    for r in learners:
        print(f"{r['job']:>4} {r['phase_s']:>8.2f} {r['train_s']:>8.2f} {r['overhead_s']:>10.2f} "
              f"{r['vs_warm_median']:>6.2f}x {r['worker_pid']:>10}")
    smoke = smoke_round(data)
    print(f"\nsmoke round on local Ray: {smoke['wall_s']:.1f} s wall (including Ray start and RM_Base)")
    for phase, seconds in {**smoke["setup_seconds"], **smoke["phase_seconds"]}.items():
        print(f"  {phase:<16} {seconds:>7.2f} s")
    result = {"benchmark": "ray_system", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": os.cpu_count(), "model": args.model, "pool_scaling": scaling,
              "learner_phases": learners, "smoke_round": smoke}
    if baseline:
        base_rows = [dict(r, overhead_s=r["phase_s"] - r["train_s"]) for r in baseline["learner_phases"]]
        compare = {"baseline_ref": args.baseline_ref,
                   "warm_learner_phase_s": [_warm(base_rows, "phase_s"), _warm(learners, "phase_s")],
                   "warm_learner_overhead_s": [_warm(base_rows, "overhead_s"), _warm(learners, "overhead_s")],
                   "smoke_round_wall_s": [baseline["smoke_round"]["wall_s"], smoke["wall_s"]]}
        print(f"\nbefore ({args.baseline_ref}) vs now, same machine, same run")
        print(f"{'':<34} {'before':>8} {'now':>8} {'now/before':>10}")
        for name, (before, now) in ((k, v) for k, v in compare.items() if k != "baseline_ref"):
            print(f"{name:<34} {before:>8.2f} {now:>8.2f} {now / before:>9.2f}x")
        result["baseline"], result["compare"] = baseline, compare
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
