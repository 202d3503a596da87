"""Weight exchange learner -> pool: naive ray.put vs packed buffer vs local disk, end to end.

Builds a random state dict of a real model shape (a transformers config instantiated on the meta
device, then one random tensor per parameter; tied embeddings counted once), and moves it from this
process (the "learner") into a separate Ray actor (the "pool member") onto ``--device``:

  naive         ray.put(state_dict) here; ray.get in the actor; .to(device) per tensor
  packed        apo_ray.models.weights.put_weights here; get_weights(ref, device) in the actor
  disk          torch.save to a local temp file here; torch.load + .to(device) in the actor

Seconds are end to end: from the moment the sender holds the state dict to the moment the actor
holds it on the device (``torch.cuda.synchronize()`` on GPU), median of ``--repeats`` runs after
one warm-up run (reported as ``first_s``). GB = 1e9 bytes of tensor data.

    python benchmarks/weight_sync.py --shape smollm2-135m --dtype bf16 --device cpu
    python benchmarks/weight_sync.py --shape qwen2.5-0.5b --dtype bf16 --device cuda --gpus-per-actor 0.4
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import ray
import torch

from apo_ray.models.weights import get_weights, put_weights

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32, "fp16": torch.float16}


def model_config(args: argparse.Namespace):
    from transformers import LlamaConfig

    from apo_ray.models.loading import shape_config

    if args.shape in ("smollm2-135m", "qwen2.5-0.5b"):
        return shape_config(args.shape)
    return LlamaConfig(
        hidden_size=args.hidden, intermediate_size=args.intermediate, num_hidden_layers=args.layers,
        num_attention_heads=args.heads, num_key_value_heads=args.heads, vocab_size=args.vocab,
        tie_word_embeddings=True,
    )  # fmt: skip


def random_state_dict(args: argparse.Namespace) -> dict[str, torch.Tensor]:
    """One random tensor per distinct parameter/buffer of the model, on ``--source-device``."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(model_config(args))
    gen = torch.Generator(device=args.source_device).manual_seed(0)
    out, seen = {}, set()
    for name, t in model.state_dict(keep_vars=True).items():
        if id(t) in seen:  # tied lm_head.weight == embed_tokens.weight: sent once, as save_pretrained does
            continue
        seen.add(id(t))
        x = torch.empty(t.shape, dtype=DTYPES[args.dtype], device=args.source_device)
        out[name] = x.normal_(0.0, 0.02, generator=gen) if x.is_floating_point() else x.zero_()
    return out


@ray.remote
class Receiver:
    """Stands in for a generator/scorer actor: receives weights onto its device."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        if self.device.type == "cuda":
            torch.zeros(1, device=self.device)  # CUDA context outside the timings

    def info(self) -> dict:
        cuda = self.device.type == "cuda"
        return {
            "device_name": torch.cuda.get_device_name(self.device) if cuda else platform.processor() or "cpu",
            "torch_threads": torch.get_num_threads(),
        }

    def _sync(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def naive(self, refs: list) -> int:
        sd = ray.get(refs[0])
        sd = {k: v.to(self.device) for k, v in sd.items()}
        self._sync()
        return len(sd)

    def packed(self, refs: list) -> int:
        sd = get_weights(refs[0], self.device)
        self._sync()
        return len(sd)

    def disk(self, path: str) -> int:
        sd = torch.load(path, map_location="cpu", weights_only=True)
        sd = {k: v.to(self.device) for k, v in sd.items()}
        self._sync()
        return len(sd)


def sync_source(args: argparse.Namespace) -> None:
    if args.source_device.startswith("cuda"):
        torch.cuda.synchronize()


def run_once(method: str, sd: dict, receiver, tmpdir: str, args: argparse.Namespace) -> float:
    sync_source(args)
    t0 = time.perf_counter()
    if method == "naive":
        ref = ray.put(sd)
        ray.get(receiver.naive.remote([ref]))
    elif method == "packed":
        ref = put_weights(sd)
        ray.get(receiver.packed.remote([ref]))
    elif method == "disk":
        path = os.path.join(tmpdir, "weights.pt")
        torch.save(sd, path)
        ray.get(receiver.disk.remote(path))
    else:
        raise ValueError(method)
    seconds = time.perf_counter() - t0
    if method == "disk":
        os.remove(path)
    else:
        del ref  # free the object before the next run
    return seconds


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shape", choices=["smollm2-135m", "qwen2.5-0.5b", "custom"], default="smollm2-135m")
    p.add_argument("--dtype", choices=list(DTYPES), default="bf16")
    p.add_argument("--device", default="cpu", help="receiver device: cpu or cuda")
    p.add_argument("--source-device", default="cpu", help="where the sender's state dict lives")
    p.add_argument("--gpus-per-actor", type=float, default=0.0, help="e.g. 0.4 to share one GPU")
    p.add_argument("--actor-cpus", type=float, default=1.0)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--methods", default="naive,packed,disk")
    p.add_argument("--tmpdir", default=None, help="local disk folder for the disk method")
    p.add_argument(
        "--out", default=None, help="JSON path (default benchmarks/results/weight_sync_<device>.json)"
    )
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--intermediate", type=int, default=1024)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--heads", type=int, default=4)
    p.add_argument("--vocab", type=int, default=32000)
    args = p.parse_args()
    if args.device.startswith("cuda") and args.gpus_per_actor <= 0:
        args.gpus_per_actor = 0.4

    t = time.perf_counter()
    sd = random_state_dict(args)
    nbytes = sum(v.numel() * v.element_size() for v in sd.values())
    print(
        f"{args.shape} {args.dtype}: {len(sd)} tensors, {nbytes / 1e9:.3f} GB (built in {time.perf_counter() - t:.1f} s)"
    )

    store = int(
        min(
            max(4 * nbytes + (1 << 30), 2 << 30),
            0.5 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES"),
        )
    )
    ray.init(
        num_cpus=max(2, int(args.actor_cpus) + 1), num_gpus=1 if args.gpus_per_actor > 0 else 0,
        object_store_memory=store, include_dashboard=False, log_to_driver=False,
    )  # fmt: skip
    receiver = Receiver.options(num_cpus=args.actor_cpus, num_gpus=args.gpus_per_actor).remote(args.device)
    info = ray.get(receiver.info.remote())

    methods = args.methods.split(",")
    rows = []
    with tempfile.TemporaryDirectory(dir=args.tmpdir) as tmpdir:
        for method in methods:
            first = run_once(method, sd, receiver, tmpdir, args)
            times = [run_once(method, sd, receiver, tmpdir, args) for _ in range(args.repeats)]
            rows.append(
                {"method": method, "first_s": first, "seconds": statistics.median(times), "all_s": times}
            )
    ref_s = {r["method"]: r["seconds"] for r in rows}
    for r in rows:
        r["gb"] = nbytes / 1e9
        r["gb_per_s"] = nbytes / 1e9 / r["seconds"]
        r["vs_disk"] = ref_s["disk"] / r["seconds"] if "disk" in ref_s else None
        r["vs_naive"] = ref_s["naive"] / r["seconds"] if "naive" in ref_s else None

    print(f"\nreceiver on {args.device} ({info['device_name']}), source on {args.source_device}, "
          f"median of {args.repeats} after 1 warm-up")  # fmt: skip
    print(
        f"{'method':<13} {'GB':>6} {'first s':>8} {'seconds':>8} {'GB/s':>7} {'vs disk':>8} {'vs naive':>9}"
    )
    for r in rows:
        vd = f"{r['vs_disk']:.2f}x" if r["vs_disk"] else "-"
        vn = f"{r['vs_naive']:.2f}x" if r["vs_naive"] else "-"
        print(
            f"{r['method']:<13} {r['gb']:>6.3f} {r['first_s']:>8.3f} {r['seconds']:>8.3f} {r['gb_per_s']:>7.2f} {vd:>8} {vn:>9}"
        )

    out = Path(args.out or f"benchmarks/results/weight_sync_{args.device.split(':')[0]}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    result = {
        "benchmark": "weight_sync",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "args": vars(args),
        "tensors": len(sd),
        "bytes": nbytes,
        "device_name": info["device_name"],
        "receiver_torch_threads": info["torch_threads"],
        "host_cpus": os.cpu_count(),
        "torch": torch.__version__,
        "ray": ray.__version__,
        "results": rows,
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")
    ray.shutdown()


if __name__ == "__main__":
    main()
