"""RM_Base's test accuracy under a preset's settings with some of them changed: a diagnostic pilot,
one seed, on another draw of the blocks than the experiments use (``data.seed=1`` by default), so
the experiments' own test items play no part in choosing anything.

    python benchmarks/rm_base_pilot.py --preset rm_claims --test 1000 -- rm.max_response_tokens=24 \\
        rm.max_response_tokens=60      # each override after -- is one variant, run in turn
    python benchmarks/rm_base_pilot.py --preset demo --test 256 -- "data.rm_pairs=160 rm.base_epochs=3"

Prints, per variant, the accuracy on the first ``--test`` test pairs with its Wilson 95% interval,
the same per data source when ``data.path`` lists several (e.g. harmless-base and helpful-base), and
the seconds it took (training RM_Base, then scoring), and writes the JSON.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import positive_int, write_result


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--preset", default="rm_claims")
    ap.add_argument("--data-seed", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0, help="the learner's seed (head initialisation, shuffle)")
    ap.add_argument("--test", type=positive_int, default=1000, help="test pairs scored")
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rm_base_pilot.json"))
    ap.add_argument("variants", nargs="+", help="after --: one quoted string of Hydra overrides per variant")
    args = ap.parse_args()

    import torch

    from apo_ray.config import compose
    from apo_ray.core.metrics import proportion_interval
    from apo_ray.data import RankedPair, load_apo_splits
    from apo_ray.models.scoring import scorer_from_config
    from apo_ray.models.training import LearnerJob, RMLoss, run_job

    torch.set_num_threads(args.threads)
    rows = []
    for variant in args.variants:
        cfg = compose([f"experiment={args.preset}", f"data.seed={args.data_seed}", *variant.split()])
        splits = load_apo_splits(cfg.data)
        pref = [RankedPair.from_preference(p) for p in splits.rm_pairs]
        start = time.perf_counter()
        job = LearnerJob.rm(cfg, lr=cfg.rm.base_lr, epochs=cfg.rm.base_epochs, seed=args.seed, loss=RMLoss())
        base, _ = run_job(job, None, pref)
        scorer = scorer_from_config(cfg)
        scorer.load_weights(base)
        test = list(splits.test_pairs[:args.test])
        scores = scorer.score([p.prompt for p in test] * 2, [p.chosen for p in test] + [p.rejected for p in test])
        right = sum(scores[i] > scores[i + len(test)] for i in range(len(test)))
        acc = proportion_interval(right, len(test))
        seconds = time.perf_counter() - start
        by_source = {}
        sources = list(dict.fromkeys(p.source for p in test))  # each pair names the source it was read from
        for source in sources if len(sources) > 1 else ():
            wins = [scores[i] > scores[i + len(test)] for i, p in enumerate(test) if p.source == source]
            by_source[source] = proportion_interval(sum(wins), len(wins))
        rows.append({"variant": variant, "rm_pairs": len(pref), "seconds": seconds, **acc, "by_source": by_source})
        print(f"{variant}: RM_Base on {len(pref)} pairs, {100 * acc['rate']:.1f}% of {len(test)} test pairs "
              f"[{100 * acc['low']:.1f}, {100 * acc['high']:.1f}] (Wilson 95%), {seconds:.0f} s", flush=True)
        for source, part in by_source.items():
            print(f"    {source}: {100 * part['rate']:.1f}% of {part['n']} [{100 * part['low']:.1f}, "
                  f"{100 * part['high']:.1f}]", flush=True)
    write_result({"benchmark": "rm_base_pilot", "preset": args.preset, "data_seed": args.data_seed,
                  "seed": args.seed, "rows": rows, "argv": sys.argv[1:]}, args.out)


if __name__ == "__main__":
    main()
