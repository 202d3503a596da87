"""Where a round's time goes: one demo-sized round of the in-process game (APOGame + InProcessSystem,
no Ray) with wall time per phase and the GPU's utilisation sampled during each phase.

Sizes are the ``demo`` experiment's (conf/experiment/demo.yaml), one round, one arm (``--arms``).
Learners run on ``--learner-device`` (InProcessSystem itself trains on CPU; here its learner calls are
given the device). ``--fast`` routes generation through FastSampler (HFGenerator(fast=True)).
Utilisation: a background thread reads ``torch.cuda.utilization()`` (pynvml) or, failing that,
``nvidia-smi`` every ``--interval`` seconds; each phase gets the mean of the samples taken while it ran.

    python benchmarks/round_phases.py --model smollm2-135m-random --dtype bfloat16 --fast     # GPU
    python benchmarks/round_phases.py --model tiny --learner-device cpu --small              # CPU smoke
"""

from __future__ import annotations

import argparse
import datetime
import json
import logging
import os
import shutil
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import torch


def gpu_utilization() -> float | None:
    if not torch.cuda.is_available():
        return None
    try:
        return float(torch.cuda.utilization())
    except Exception:  # noqa: BLE001 - pynvml missing or unsupported: ask nvidia-smi
        try:
            out = subprocess.run(["nvidia-smi", "--query-gpu=utilization.gpu", "--format=csv,noheader,nounits"],
                                 capture_output=True, text=True, timeout=5, check=True).stdout
            return float(out.split()[0])
        except Exception:  # noqa: BLE001
            return None


class Sampler(threading.Thread):
    def __init__(self, interval: float):
        super().__init__(daemon=True)
        self.interval, self.samples, self._stop_event = interval, [], threading.Event()

    def run(self) -> None:
        while not self._stop_event.is_set():
            util = gpu_utilization()
            if util is not None:
                self.samples.append((time.perf_counter(), util))
            self._stop_event.wait(self.interval)

    def stop(self) -> None:
        self._stop_event.set()
        self.join()

    def mean(self, start: float, end: float) -> float | None:
        vals = [u for t, u in self.samples if start <= t <= end]
        return statistics.fmean(vals) if vals else None


def demo_config(args):
    from apo_ray.config import Config, validate

    cfg = Config()
    cfg.model.policy = cfg.model.reward = args.model
    cfg.model.dtype = args.dtype
    cfg.data.path = args.data
    d, g, rm, p = cfg.data, cfg.generation, cfg.rm, cfg.policy
    d.rm_pairs, d.gold_queries, d.llm_queries, d.dev_pairs, d.test_pairs = 32, 16, 64, 32, 48
    g.sampling.max_new_tokens = g.testing.max_new_tokens = 32
    g.max_prompt_tokens, g.prompts_per_batch = 96, 16
    rm.base_lr, rm.base_epochs, rm.lr, rm.pairs_per_batch, rm.micro_pairs = 2e-5, 2, 5e-6, 16, 8
    rm.max_length, rm.score_batch = 160, 32
    p.lrs, p.sequences_per_batch, p.micro_sequences, p.max_length = [1e-5], 16, 8, 160
    cfg.apo.rounds, cfg.apo.samples_per_query, cfg.apo.beta2 = 1, 4, 10.0
    cfg.apo.arms = args.arms.split(",")
    cfg.eval.eval_rm, cfg.eval.test_queries = False, 48
    if args.small:  # CPU smoke sizes
        d.rm_pairs, d.gold_queries, d.llm_queries, d.dev_pairs, d.test_pairs = 16, 8, 12, 8, 8
        g.sampling.max_new_tokens = g.testing.max_new_tokens = 8
        g.max_prompt_tokens = 64
        rm.max_length = p.max_length = 96
        cfg.apo.samples_per_query, cfg.eval.test_queries, rm.base_epochs = 2, 8, 1
    validate(cfg)
    return cfg


def make_system(cfg, args):
    from apo_ray.runtime.in_process import InProcessSystem

    cfg.generation.fast_sampler = args.fast  # HFGenerator(fast=...): the FastSampler on CUDA
    system = InProcessSystem(cfg)
    system.device = args.learner_device  # the learners' device
    return system


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="smollm2-135m-random")
    ap.add_argument("--dtype", default="bfloat16" if torch.cuda.is_available() else "float32")
    ap.add_argument("--learner-device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--arms", default="apo")
    ap.add_argument("--data", default=os.environ.get("APO_HH_DATA") or "embedded:hh-rlhf-harmless-test")
    ap.add_argument("--fast", action="store_true", help="HFGenerator(fast=True): FastSampler on CUDA")
    ap.add_argument("--small", action="store_true", help="smoke sizes (CPU)")
    ap.add_argument("--interval", type=float, default=0.2)
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/round_phases_<model>.json)")
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    import transformers

    from apo_ray.game.events import PhaseFinished
    from apo_ray.game.game_data import build_game_data
    from apo_ray.game.loop import APOGame
    from apo_ray.game.store import PhaseStore
    cfg = demo_config(args)
    events: list[dict] = []

    def on_event(event) -> None:
        if isinstance(event, PhaseFinished):
            end = time.perf_counter()
            events.append({"phase": event.phase, "key": event.key, "seconds": event.seconds,
                           "start": end - event.seconds, "end": end})

    sampler = Sampler(args.interval)
    sampler.start()
    start = time.perf_counter()
    data = build_game_data(cfg)
    data_s = time.perf_counter() - start
    tmp = Path(tempfile.mkdtemp(prefix="round_phases."))
    try:
        system = make_system(cfg, args)
        game = APOGame(cfg, system, data, PhaseStore(tmp / "phases", system), on_event=on_event)
        records = game.run()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    wall = time.perf_counter() - start
    sampler.stop()

    phases: dict[str, dict] = {}
    for e in events:
        row = phases.setdefault(e["phase"], {"seconds": 0.0, "calls": 0, "util_samples": []})
        row["seconds"] += e["seconds"]
        row["calls"] += 1
        util = sampler.mean(e["start"], e["end"])
        if util is not None:
            row["util_samples"].append((util, e["seconds"]))
    print(f"one round of {cfg.apo.arms} with {args.model} ({args.dtype}), learners on {args.learner_device}, "
          f"fast generation {args.fast}: {wall:.1f} s wall ({data_s:.1f} s data)")
    print(f"{'phase':<28}{'calls':>6}{'seconds':>10}{'share':>8}{'GPU util %':>12}")
    for name, row in sorted(phases.items(), key=lambda kv: -kv[1]["seconds"]):
        samples = row.pop("util_samples")
        weight = sum(s for _, s in samples)
        row["gpu_util"] = sum(u * s for u, s in samples) / weight if weight else None
        util = f"{row['gpu_util']:.0f}" if row["gpu_util"] is not None else "-"
        print(f"{name:<28}{row['calls']:>6}{row['seconds']:>10.2f}{row['seconds'] / wall:>8.1%}{util:>12}")
    overall = statistics.fmean(u for _, u in sampler.samples) if sampler.samples else None
    result = {
        "benchmark": "round_phases", "model": args.model, "dtype": args.dtype, "learner_device": args.learner_device,
        "fast_generation": args.fast, "arms": cfg.apo.arms, "small": args.small,
        "device_name": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": transformers.__version__, "wall_s": wall, "data_s": data_s, "gpu_util_mean": overall,
        "phases": phases, "records": [{k: v for k, v in r.items() if not k.endswith("bins")} for r in records],
    }
    name = args.model.replace("/", "_")
    out = Path(args.out or Path(__file__).parent / "results" / f"round_phases_{name}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2, default=str) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
