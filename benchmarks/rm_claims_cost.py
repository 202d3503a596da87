"""What one seed of the RM claims costs in its RM phases, with and without the frozen-block states
shared across RMs (apo_ray/models/frozen_cache.py), side by side in one run.

A "seed" here is the RM work of `experiment=rm_claims`' round 1 at a chosen scale, on the real
SmolLM2-135M-Instruct and the real HH pairs of its blocks: train RM_Base on D_P; train RM_APO-v1
from it on D_P + D_APO (gold answers against the policy's real samples, drawn once before timing:
sampling does not use the cache); train RM_Base-AB step for step without D_APO; score the test
pairs with the three RMs. Three modes, alternating in every repeat:

- ``whole``: every forward runs all 30 blocks (``rm.frozen_cache_mib=0``, the old path);
- ``cached-first``: the process's cache emptied first (the first seed of a sweep builds it);
- ``cached-later``: the cache kept from the previous repeat (every later seed of a sweep, which
  runs in one process: benchmarks/science.py's Hydra multirun).

Prints a table of medians over the repeats with their min-max spread and the 1-minute load average
(the machine is shared), and writes the JSON.

    python benchmarks/rm_claims_cost.py --pref 96 --apo 32 --test 128 --repeats 5
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import positive_int, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--pref", type=positive_int, default=96, help="D_P pairs (rm_claims: 600)")
    ap.add_argument("--apo", type=positive_int, default=32, help="golden queries, one sample each (rm_claims: 64 x S=4)")
    ap.add_argument("--test", type=positive_int, default=128, help="test pairs (rm_claims: 3,900)")
    ap.add_argument("--repeats", type=positive_int, default=5)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rm_claims_cost.json"))
    args = ap.parse_args()

    import torch

    from apo_ray.config import compose
    from apo_ray.data import RankedPair, load_apo_splits
    from apo_ray.models import frozen_cache
    from apo_ray.models.generators import generator_from_config
    from apo_ray.models.scoring import scorer_from_config
    from apo_ray.models.training import LearnerJob, RMLoss, run_job

    torch.set_num_threads(args.threads)
    cfg = compose(["experiment=rm_claims"])
    splits = load_apo_splits(cfg.data)
    pref = [RankedPair.from_preference(p) for p in splits.rm_pairs[:args.pref]]
    test = list(splits.test_pairs[:args.test])
    gold = list(dict.fromkeys(p.prompt for p in splits.rm_pairs))[:args.apo]
    chosen = {p.prompt: p.chosen for p in splits.rm_pairs}
    generator = generator_from_config(cfg)
    samples = generator.generate(gold, n=1, seed=0, decoding=cfg.generation.sampling)
    apo = [RankedPair(q, chosen[q], s[0], "apo") for q, s in zip(gold, samples)]
    del generator
    loss = RMLoss(beta2=cfg.apo.beta2, apo_weight=cfg.apo.apo_weight)

    def one_seed(cache_mib: float) -> dict[str, float]:
        cfg.rm.frozen_cache_mib = cache_mib
        times = {}
        t0 = time.perf_counter()
        base, _ = run_job(LearnerJob.rm(cfg, lr=cfg.rm.base_lr, epochs=1, seed=0, loss=RMLoss()), None, pref)
        times["train_rm_base"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        v1, _ = run_job(LearnerJob.rm(cfg, lr=cfg.rm.lr, epochs=1, seed=1, loss=loss), base, apo + pref)
        times["train_rm_apo"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        slots = [RankedPair("", "", "", "apo")] * len(apo)
        ab, _ = run_job(LearnerJob.rm(cfg, lr=cfg.rm.lr, epochs=1, seed=1,
                                      loss=dataclasses.replace(loss, skip_apo_pairs=True)), base, slots + pref)
        times["train_rm_ablation"] = time.perf_counter() - t0
        t0 = time.perf_counter()
        scorer = scorer_from_config(cfg)
        for state in (base, v1, ab):
            scorer.load_weights(state)
            scorer.score([p.prompt for p in test] * 2, [p.chosen for p in test] + [p.rejected for p in test])
        times["score_test"] = time.perf_counter() - t0
        times["total"] = sum(times.values())
        return times

    modes = {"whole": 0.0, "cached-first": cfg.rm.frozen_cache_mib, "cached-later": cfg.rm.frozen_cache_mib}
    runs: dict[str, list[dict]] = {m: [] for m in modes}
    loads = []
    for rep in range(args.repeats):
        for mode, mib in modes.items():
            if mode != "cached-later":
                frozen_cache._caches.clear()
            loads.append(os.getloadavg()[0])
            runs[mode].append(one_seed(mib))
            print(f"repeat {rep} {mode}: {runs[mode][-1]['total']:.1f} s", flush=True)

    phases = list(runs["whole"][0])
    summary = {m: {ph: {"median_s": statistics.median(r[ph] for r in rs), "min_s": min(r[ph] for r in rs),
                        "max_s": max(r[ph] for r in rs)} for ph in phases} for m, rs in runs.items()}
    print(f"\nRM phases of one rm_claims seed at {args.pref} D_P / {len(apo)} APO / {len(test)} test pairs, "
          f"{args.repeats} alternating repeats, {args.threads} threads; load average (1 min) "
          f"median {statistics.median(loads):.1f} (min {min(loads):.1f}, max {max(loads):.1f})")
    print(f"{'phase':<20}" + "".join(f"{m:>26}" for m in modes) + f"{'whole / cached-later':>22}")
    for ph in phases:
        cells = "".join(f"{summary[m][ph]['median_s']:>10.1f} [{summary[m][ph]['min_s']:.1f}-"
                        f"{summary[m][ph]['max_s']:.1f}]".rjust(26) for m in modes)
        ratio = summary["whole"][ph]["median_s"] / max(summary["cached-later"][ph]["median_s"], 1e-9)
        print(f"{ph:<20}{cells}{ratio:>21.2f}x")
    write_result({"benchmark": "rm_claims_cost", "sizes": {"pref": args.pref, "apo": len(apo), "test": len(test)},
                  "repeats": args.repeats, "threads": args.threads, "precision": cfg.model.train_precision,
                  "dtype": cfg.model.dtype, "load_average_1min": loads, "runs": runs, "summary": summary,
                  "argv": sys.argv[1:]}, args.out)


if __name__ == "__main__":
    main()
