"""Object-store bytes across the rounds of a run: does a long run's use stay flat?

Plays ``experiment=smoke`` for ``--rounds`` rounds of the four arms (fixed, apo, apo_seq, ablation)
on a local Ray instance, with the game in this process (as in the driver actor), and reads the
cluster's object-store bytes and objects (Ray's ``internal_api`` memory summary, what
``ray memory --stats-only`` prints) at two points of every round:

- ``at_last_eval``: when the round's last arm has been evaluated (its ``round_done`` event); every
  version of the code has this point, so ``--baseline-ref`` can run the same measurement on an
  earlier commit;
- ``round_end``: the game's own reading after all arms (``APOGame.round_end``; only code that has it),
  with the model versions the game keeps alive.

``--baseline-ref REF`` first runs this same script with the package of git ``REF`` (a temporary
worktree on ``PYTHONPATH``) and prints both side by side.

    python benchmarks/object_store_rounds.py --rounds 3
    python benchmarks/object_store_rounds.py --rounds 3 --baseline-ref 15fa507
"""

import argparse
import gc
import json
import os
import platform
import tempfile
import time
from pathlib import Path

from results_io import run_at_ref

ROOT = Path(__file__).resolve().parents[1]
ARMS = ["fixed", "apo", "apo_seq", "ablation"]


def object_store() -> dict:
    """The cluster's plasma bytes and objects now (after a garbage collection)."""
    import ray
    from ray._private.internal_api import get_memory_info_reply, get_state_from_address

    gc.collect()
    stats = get_memory_info_reply(get_state_from_address(ray.get_runtime_context().gcs_address)).store_stats
    return {"bytes": stats.object_store_bytes_used, "objects": stats.num_local_objects}


def play(rounds: int, data: str) -> dict:
    import ray
    from hydra import compose, initialize_config_dir

    import apo_ray
    from apo_ray.config import from_omegaconf, register_configs
    from apo_ray.game.events import ArmRoundFinished, RoundFinished
    from apo_ray.runtime.play import play_game
    from apo_ray.runtime.ray_system import RaySystem

    register_configs()
    out = tempfile.mkdtemp(prefix="apo-objstore-")
    conf = Path(apo_ray.__file__).resolve().parents[1] / "conf"  # the configs of the package measured
    with initialize_config_dir(str(conf), version_base="1.3"):
        node = compose("config", overrides=["experiment=smoke", f"apo.rounds={rounds}", f"apo.arms=[{','.join(ARMS)}]",
                                            f"data.path={data}", f"run.output_dir={out}", "run.save_models=none"])
    cfg = from_omegaconf(node)
    ray.init(num_cpus=4, include_dashboard=False)
    rows: dict[int, dict] = {}
    start = time.perf_counter()

    def on_event(event) -> None:
        if isinstance(event, ArmRoundFinished) and event.arm == ARMS[-1]:
            rows.setdefault(event.round, {})["at_last_eval"] = object_store()
        elif isinstance(event, RoundFinished):
            rows.setdefault(event.round, {})["round_end"] = {
                "bytes": event.usage["object_store_bytes"], "objects": event.usage["object_store_objects"],
                "live_versions": list(event.live_versions)}
            time.sleep(1.0)
            rows[event.round]["one_second_later"] = object_store()
            print(f"round {event.round}: {event.usage['object_store_bytes'] / 2**20:.1f} MiB, "
                  f"{len(event.live_versions)} versions alive; 1 s later "
                  f"{rows[event.round]['one_second_later']['bytes'] / 2**20:.1f} MiB", flush=True)

    try:
        play_game(cfg, RaySystem(cfg, namespace="bench-objstore"), on_event=on_event)
    finally:
        ray.shutdown()
    return {"rounds": [dict(rows[r], round=r) for r in sorted(rows)], "wall_s": time.perf_counter() - start}


def run_baseline(ref: str, args: argparse.Namespace) -> dict:
    """This script with the package as it was at git ``ref`` (a temporary worktree on PYTHONPATH)."""
    return run_at_ref(ref, Path(__file__).resolve(), ["--rounds", str(args.rounds), "--data", args.data])


def mib(row: dict | None) -> str:
    return f"{row['bytes'] / 2**20:>9.1f} {int(row['objects']):>7}" if row else f"{'-':>9} {'-':>7}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--data", default="embedded:hh-rlhf-harmless-test")
    ap.add_argument("--out", default="benchmarks/results/object_store_rounds_cpu.json")
    ap.add_argument("--baseline-ref", default=None, help="git ref whose package runs the same measurement first")
    args = ap.parse_args()
    baseline = run_baseline(args.baseline_ref, args) if args.baseline_ref else None
    now = play(args.rounds, args.data)
    print(f"\nobject store after each round, experiment=smoke, arms {ARMS} (MiB, objects)")
    header = f"{'round':>5} | {'last eval':>17} | {'round end':>17} {'versions':>8}"
    if baseline:
        header += f" | {'before: last eval':>17}"
    print(header)
    before = {r["round"]: r for r in baseline["now"]["rounds"]} if baseline else {}
    for row in now["rounds"]:
        end = row.get("round_end")
        line = f"{row['round']:>5} | {mib(row.get('at_last_eval'))} | {mib(end)} {len(end['live_versions']) if end else 0:>8}"
        if baseline:
            line += f" | {mib(before.get(row['round'], {}).get('at_last_eval'))}"
        print(line)
    result = {"benchmark": "object_store_rounds", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "cpus": os.cpu_count(), "experiment": "smoke", "arms": ARMS, "now": now}
    if baseline:
        result["baseline_ref"], result["baseline"] = args.baseline_ref, baseline
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
