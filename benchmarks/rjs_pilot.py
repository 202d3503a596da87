"""Did one round of RJS move the policy? Reads a finished run of ``experiment=rjs_pilot`` (or any
run whose ``fixed`` arm played round 1) and compares RJS round 1's test answers with the initial
policy's, prompt by prompt:

- under the run's evaluation RM (its scores are in the run), the score claim 0 is about;
- under RM_Base, the RM that RJS optimises (scored here from the run's checkpoint: a policy that
  does not raise even that score has not learnt anything from the round).

Each as the mean paired difference over the test prompts with its percentile-bootstrap 95%
interval, beside the evaluation RM's own test accuracy and how many answers changed at all.

    python jobs/apo.py experiment=rjs_pilot run.in_process=true run.seed=0 run.output_dir=outputs/rjs_pilot
    python benchmarks/rjs_pilot.py --run-dir outputs/rjs_pilot
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import positive_int, write_result

BASELINE_ARM = "fixed"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--run-dir", required=True, help="the run's output folder (summary.json, phases/)")
    ap.add_argument("--preset", default="rjs_pilot", help="the run's experiment= preset (rebuilds its test prompts)")
    ap.add_argument("--resamples", type=positive_int, default=2000)
    ap.add_argument("--threads", type=positive_int, default=2)
    ap.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "rjs_pilot.json"))
    ap.add_argument("overrides", nargs="*", help="after --: the Hydra overrides the run was started with")
    args = ap.parse_args()

    import numpy as np
    import torch

    from apo_ray.config import compose
    from apo_ray.core.metrics import mean_difference_interval
    from apo_ray.game.game_data import build_game_data, eval_prompts
    from apo_ray.game.store import checkpoint_name, load_checkpoint
    from apo_ray.models.scoring import scorer_from_config
    from apo_ray.outputs.claims import load_run

    torch.set_num_threads(args.threads)
    run_dir = Path(args.run_dir)
    try:
        run = load_run(run_dir)
    except FileNotFoundError as exc:
        raise SystemExit(str(exc)) from None
    before, after = run.record(BASELINE_ARM, 0), run.record(BASELINE_ARM, 1)
    if before is None or after is None:
        raise SystemExit(f"{run_dir}: no {BASELINE_ARM} arm record for round 0 and round 1 in summary.json")
    cfg = compose([f"experiment={args.preset}", f"run.seed={run.seed}", *args.overrides])
    recorded = {k: run.config.get("data", {}).get(k) for k in ("seed", "test_pairs", "path")}
    rebuilt = {"seed": cfg.data.seed, "test_pairs": cfg.data.test_pairs, "path": cfg.data.path}
    if recorded != rebuilt:
        raise SystemExit(f"{run_dir}: the run's data settings {recorded} are not the preset's {rebuilt}: "
                         "pass --preset and the run's overrides after --")
    queries = eval_prompts(cfg, build_game_data(cfg))
    answers = {}
    for rec in (before, after):
        stored = run.store.get(f"samples/{rec['policy']}/test")
        if stored is None or len(stored) != len(queries):
            raise SystemExit(f"{run_dir}: {rec['policy']}'s test answers are missing or not {len(queries)} long")
        answers[rec["policy"]] = [a[0] for a in stored]

    start = time.perf_counter()
    scorer = scorer_from_config(cfg)
    try:
        rm_base = load_checkpoint(run_dir / "phases" / checkpoint_name(before["rm"]))
    except (ValueError, FileNotFoundError) as exc:  # e.g. science.py deleted a finished seed's weights
        raise SystemExit(f"{exc}: RM_Base's weights are needed to rescore the answers (benchmarks/science.py "
                         "keeps them with --keep-weights)") from None
    scorer.load_weights(rm_base)
    by_scorer = {before["rm"]: {p: np.asarray(scorer.score(queries, a)) for p, a in answers.items()}}
    score_seconds = time.perf_counter() - start
    for eval_rm in before.get("policy_rewards") or {}:
        by_scorer[eval_rm] = {p: run.policy_scores(eval_rm, p) for p in answers}

    rows = []
    for name, scores in by_scorer.items():
        mine, theirs = scores[after["policy"]], scores[before["policy"]]
        diff = mean_difference_interval(mine, theirs, n_resamples=args.resamples, seed=0)
        quality = ({"acc": before.get("rm_test_acc"), "ece": before.get("rm_test_ece")} if name == before["rm"]
                   else (before.get("eval_rm_quality") or {}).get(name, {}))
        rows.append({"scorer": name, "role": "optimised by RJS" if name == before["rm"] else "evaluation RM",
                     "init_mean": float(theirs.mean()), "rjs_r1_mean": float(mine.mean()), "diff": diff,
                     "scorer_test_acc": quality.get("acc"), "scorer_test_ece": quality.get("ece")})
    changed = sum(a != b for a, b in zip(answers[before["policy"]], answers[after["policy"]]))
    timing = json.loads((run_dir / "run_timing.json").read_text()) if (run_dir / "run_timing.json").exists() else {}
    result = {"benchmark": "rjs_pilot", "run_dir": str(run_dir), "preset": args.preset, "seed": run.seed,
              "test_prompts": len(queries), "answers_changed": changed, "rows": rows,
              "phase_seconds": after.get("phase_seconds"), "setup_phase_seconds": before.get("phase_seconds"),
              "run_wall_seconds": timing.get("wall_seconds"), "rm_base_rescoring_seconds": score_seconds}

    print(f"RJS round 1 vs the initial policy, {len(queries)} test prompts ({changed} answers changed), seed {run.seed}")
    print(f"{'scorer':<12} {'role':<18} {'test acc':>8} {'init':>8} {'RJS r1':>8}  RJS r1 - init [95% CI]")
    for r in rows:
        acc = "-" if r["scorer_test_acc"] is None else f"{100 * r['scorer_test_acc']:.1f}%"
        d = r["diff"]
        print(f"{r['scorer']:<12} {r['role']:<18} {acc:>8} {r['init_mean']:>8.3f} {r['rjs_r1_mean']:>8.3f}  "
              f"{d['estimate']:+.3f} [{d['low']:+.3f}, {d['high']:+.3f}]")
    write_result(result, args.out)


if __name__ == "__main__":
    main()
