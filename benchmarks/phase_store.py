"""What a durable, checksummed weights phase costs against the plain save it replaced.

Side by side in one run, on a random state dict of a real model shape (``--shape``, ``--dtype`` as in
``weight_sync.py``), in a temporary folder on the disk that holds ``--dir``:

- ``save``: a plain save: ``InProcessSystem.save_weights`` (the checkpoint file, here the whole
  state dict, written under a temporary name + rename) and a plain JSON marker;
- ``put_weights``: ``PhaseStore.put_version`` now: the same save, then fsync of the file and the
  folder, SHA-256 of the file (read back, mostly from the page cache) and a marker written durably;
- ``load`` / ``get_weights``: the system's load alone vs ``PhaseStore.get_version`` (size + checksum check and load),
  each followed by copying every tensor into a model-shaped state dict (what ``load_state_dict``
  does on a resume): safetensors maps the file lazily, so a load that touches nothing costs ~0.

Median of ``--repeats`` (the four steps take turns in each repeat; one warm-up repeat first) with
min-max and each repeat's load average. Prints a table; writes JSON under ``benchmarks/results/``.

    python benchmarks/phase_store.py --shape smollm2-135m --dtype fp32
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `python benchmarks/phase_store.py` from a checkout, as the other benchmarks

from apo_ray.config import Config
from apo_ray.game.store import PhaseStore
from apo_ray.runtime.in_process import InProcessSystem
from benchmarks.results_io import positive_int
from benchmarks.weight_sync import DTYPES, random_state_dict


def timed(fn, *args) -> float:
    start = time.perf_counter()
    fn(*args)
    return time.perf_counter() - start


def load_into(load, path_or_key, target: dict) -> None:
    """Load a checkpoint and copy every tensor into ``target`` (a resume's ``load_state_dict``)."""
    loaded = load(path_or_key)
    state = getattr(loaded, "handle", loaded)  # the store gives a Weights, the system a state dict
    for name, tensor in state.items():
        target[name].copy_(tensor)


def old_save(system: InProcessSystem, sd: dict, pt: Path) -> None:
    """A weights phase before: the system's save and a plain marker."""
    system.save_weights(sd, pt)
    pt.with_suffix(".json").write_text(json.dumps({"loss": 1.0}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="smollm2-135m")
    parser.add_argument("--dtype", default="fp32", choices=sorted(DTYPES))
    parser.add_argument("--repeats", type=positive_int, default=5)
    parser.add_argument("--dir", default=None, help="where the temporary phase folder goes (default: the system's)")
    parser.add_argument("--out", default="benchmarks/results/phase_store_cpu.json")
    args = parser.parse_args()
    args.source_device = "cpu"
    sd = random_state_dict(args)
    system = InProcessSystem(Config())
    target = {name: tensor.clone() for name, tensor in sd.items()}
    times: dict[str, list[float]] = {"save": [], "put_weights": [], "load": [], "get_weights": []}
    load_averages: list[float] = []
    with tempfile.TemporaryDirectory(dir=args.dir) as tmp:
        store = PhaseStore(Path(tmp) / "phases", system)
        for i in range(args.repeats + 1):
            plain, key = Path(tmp) / f"plain{i}.safetensors", f"rm/r{i}"
            sample = {"save": timed(old_save, system, sd, plain),
                      "put_weights": timed(store.put_version, key, sd, {"loss": 1.0}),
                      "load": timed(load_into, system.load_weights, plain, target),
                      "get_weights": timed(load_into, store.get_version, key, target)}
            if i:  # the first round warms the page cache and the allocator
                for k, v in sample.items():
                    times[k].append(v)
                load_averages.append(os.getloadavg()[0])
        size = plain.stat().st_size
    median = {k: statistics.median(v) for k, v in times.items()}
    rows = [("write a weights phase", "save", "put_weights"), ("read it back on resume", "load", "get_weights")]
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    print(f"{args.shape} {args.dtype}: {size / 1e9:.3f} GB per checkpoint, median [min-max] of {args.repeats}, "
          f"load average {statistics.median(load_averages):.2f} [{min(load_averages):.2f}-{max(load_averages):.2f}]")
    print("| what | before (s) | now (s) | ratio |\n|---|---|---|---|")
    for what, before, now in rows:
        print(f"| {what} | {median[before]:.3f} [{spread[before][0]:.3f}-{spread[before][1]:.3f}] | "
              f"{median[now]:.3f} [{spread[now][0]:.3f}-{spread[now][1]:.3f}] | {median[now] / median[before]:.2f}x |")
    result = {"date": datetime.datetime.now().isoformat(timespec="seconds"), "machine": platform.processor()
              or platform.machine(), "torch": torch.__version__, "shape": args.shape, "dtype": args.dtype,
              "bytes": size, "repeats": args.repeats, "seconds": times, "median_seconds": median,
              "load_average_1min": load_averages}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
