"""LoRA vs full weights: what one round's weight exchange moves and costs, and the learner's step time.

Exchange (``--part exchange``): the real SmolLM2-135M-Instruct policy and RM (fp32, as learners hand
versions back), each as a full state dict and as a LoRA adapter (rank ``--rank`` on all seven
projections of every block; the RM's with its head), moved the way the run moves them, side by side
in one process and one local Ray instance, median of ``--repeats``:

  publish     apo_ray.models.weights.put_weights: pack into one buffer, ray.put (learner side)
  receive     ray.get + load into the receiver: HFGenerator / RewardScorer (copy in place, or the
              adapter into the injected adapter layers)
  checkpoint  torch.save of the version (the phase store's .pt) and its size

A round moves one policy version and one RM version per arm. The 7B rows are projected: bytes from
the llama-7b shape (full fp32 weights, or the adapter's parameter count), seconds at the measured
bytes/s of the 135M full exchange (a lower bound for the adapter, whose fixed costs dominate).

Step time (``--part step``): train_reward_model / train_policy on real HH pairs at the demo's shape
(conf/experiment/demo.yaml: 16 pairs or sequences per step, micro-batches of 8, 80 tokens), fp32,
``--steps`` steps per run, runs interleaved: trainable_layers=4 (the demo) vs LoRA rank ``--rank``
on every block vs LoRA on the top 4 blocks. Seconds per optimiser step, median and spread.

    python benchmarks/lora_exchange.py --out benchmarks/results/lora_exchange.json
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import os
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from results_io import write_result

from apo_ray.config import LoraConfig
from apo_ray.models import lora

MODEL = "smollm2-135m-instruct"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def _median(xs: list[float]) -> dict:
    return {"median": statistics.median(xs), "min": min(xs), "max": max(xs), "n": len(xs)}


def _versions(rank: int) -> dict[str, dict[str, torch.Tensor]]:
    """role/kind -> the state dict a learner would hand back (adapters with random B: non-zero)."""
    from apo_ray.models.loading import load_policy, load_reward_model

    out = {}
    for role, load in (("policy", load_policy), ("rm", load_reward_model)):
        torch.manual_seed(0)
        model = load(MODEL, dtype="float32")
        out[f"{role}/full"] = {k: v.clone() for k, v in model.state_dict().items()}
        spec = lora.spec_for(model, MODEL, role, LoraConfig(rank=rank, target_modules=TARGETS), None)
        peft_model = lora.apply_lora(model, spec)
        with torch.no_grad():
            for p in lora.adapter_parameters(peft_model).values():
                p.add_(0.01 * torch.randn_like(p))
        out[f"{role}/lora"] = lora.adapter_state(peft_model, spec)
    return out


def exchange(args) -> list[dict]:
    import ray

    from apo_ray.game.system import Weights
    from apo_ray.models.generation import HFGenerator
    from apo_ray.models.scoring import RewardScorer
    from apo_ray.models.weights import load_packed_into, put_weights, unpack_state_dict
    from apo_ray.runtime.workers import fetch_weights

    versions = _versions(args.rank)
    # one receiver per version kind: a model that serves adapters holds injected adapter layers
    receivers = {name: (HFGenerator if name.startswith("policy") else RewardScorer)(MODEL, dtype="float32",
                                                                                   device="cpu")
                 for name in versions}
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    rows = []
    try:
        timings = {name: {"publish": [], "receive": [], "checkpoint": []} for name in versions}
        sizes = {}
        tmp = Path(tempfile.mkdtemp(prefix="lora-bench-"))
        for rep in range(args.repeats + 1):  # the first pass warms up (page faults, lazy imports)
            for name, state in versions.items():
                receiver = receivers[name]
                t0 = time.perf_counter()
                ref = put_weights(state)
                t1 = time.perf_counter()
                packed = fetch_weights(Weights(f"{name}/{rep}", ref))  # ray.get: a view of the store
                if lora.is_adapter(packed.names):
                    receiver.load_weights(unpack_state_dict(packed))
                else:
                    load_packed_into(receiver.model, packed)  # what workers.VersionedModel does
                t2 = time.perf_counter()
                path = tmp / f"{name.replace('/', '-')}.pt"
                torch.save(state, path)
                t3 = time.perf_counter()
                sizes[name] = {"object_store_bytes": packed.total_bytes, "checkpoint_bytes": path.stat().st_size,
                               "tensors": len(state)}
                del packed, ref
                if rep:
                    timings[name]["publish"].append(t1 - t0)
                    timings[name]["receive"].append(t2 - t1)
                    timings[name]["checkpoint"].append(t3 - t2)
        for name in versions:
            rows.append({"version": name, **sizes[name],
                         **{f"{k}_s": _median(v) for k, v in timings[name].items()}})
    finally:
        ray.shutdown()
    return rows


def project_7b(rows: list[dict], rank: int) -> list[dict]:
    """Bytes of a llama-7b version, full (fp32) and as an adapter, and seconds at the measured rate."""
    from apo_ray.models.loading import shape_config

    c = shape_config("llama-7b")
    h, i, n, v = c.hidden_size, c.intermediate_size, c.num_hidden_layers, c.vocab_size
    kv = h * c.num_key_value_heads // c.num_attention_heads
    per_block = 4 * h * h + 3 * h * i + 2 * h if kv == h else None
    full_params = n * per_block + 2 * v * h + h  # embedding + untied head + final norm
    # LoRA: r * (in + out) per target linear
    lora_params = n * rank * (4 * (h + h) + 2 * (h + i) + (i + h))
    full = next(r for r in rows if r["version"] == "policy/full")
    rate = full["object_store_bytes"] / (full["publish_s"]["median"] + full["receive_s"]["median"])
    out = []
    for kind, params in (("full", full_params), ("lora", lora_params)):
        nbytes = params * 4
        out.append({"version": f"llama-7b policy/{kind} (projected)", "params": params, "bytes": nbytes,
                    "exchange_s_at_measured_rate": nbytes / rate})
    return out


def step_time(args, partial=lambda rows: None) -> list[dict]:
    """``partial(rows)`` after every repeat: the result so far is written (a long run may be cut short)."""
    from apo_ray.data import RankedPair, load_preference_pairs
    from apo_ray.models.training import PolicyLoss, TrainSettings, train_policy, train_reward_model

    pairs = load_preference_pairs(args.data, limit=16 * args.steps) if args.data else None
    if pairs is None:
        from apo_ray.data import DEFAULT_DATA

        pairs = load_preference_pairs(DEFAULT_DATA, limit=16 * args.steps)
    rm_pairs = [RankedPair.from_preference(p) for p in pairs]
    sft = [(p.prompt, p.chosen) for p in pairs]
    base = TrainSettings(lr=1e-5, examples_per_step=16, micro_examples=8, max_length=80, precision="fp32")
    arms = {f"trainable_layers={args.top}": {"trainable_layers": args.top},
            f"lora r{args.rank} all blocks": {"lora": LoraConfig(rank=args.rank, target_modules=TARGETS)},
            f"lora r{args.rank} top {args.top} blocks": {"lora": LoraConfig(rank=args.rank, target_modules=TARGETS),
                                                         "trainable_layers": args.top}}
    seconds: dict[tuple, list[float]] = {}
    for rep in range(args.repeats):
        for role in args.roles:
            for arm, kw in arms.items():
                s = dataclasses.replace(base, seed=rep, **kw)
                if role == "rm":
                    _, stats = train_reward_model(MODEL, None, rm_pairs, s)
                else:
                    _, stats = train_policy(MODEL, None, sft, s, loss=PolicyLoss("rjs"))
                seconds.setdefault((role, arm), []).append(stats["seconds"] / stats["steps"])
                print(f"  {role:6s} {arm:24s} {seconds[(role, arm)][-1]:.2f} s/step", flush=True)
        partial([{"role": role, "arm": arm, "step_s": _median(v)} for (role, arm), v in seconds.items()])
    return [{"role": role, "arm": arm, "step_s": _median(v)} for (role, arm), v in seconds.items()]


def main() -> None:
    global MODEL
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--part", choices=["exchange", "step", "both"], default="both")
    ap.add_argument("--rank", type=int, default=8)
    ap.add_argument("--model", default=MODEL, help="another model name, e.g. tiny-random-llama to try the script")
    ap.add_argument("--top", type=int, default=4, help="trainable_layers of the comparison (the demo's 4)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--roles", nargs="+", default=["rm", "policy"])
    ap.add_argument("--data", default=os.environ.get("APO_HH_DATA"))
    ap.add_argument("--out", default="benchmarks/results/lora_exchange.json")
    args = ap.parse_args()
    MODEL = args.model
    result = {"when": datetime.datetime.now(datetime.UTC).isoformat(), "machine": platform.processor()
              or platform.machine(), "cpus": os.cpu_count(), "torch_threads": torch.get_num_threads(),
              "rank": args.rank, "model": MODEL, "load_average_before": os.getloadavg()}
    if args.part in ("exchange", "both"):
        rows = exchange(args)
        result["exchange"] = rows
        result["exchange_7b"] = project_7b(rows, args.rank)
        print(f"\n{'version':40s} {'store MB':>9s} {'ckpt MB':>8s} {'publish s':>10s} {'receive s':>10s} "
              f"{'save s':>8s}")
        for r in rows:
            print(f"{r['version']:40s} {r['object_store_bytes'] / 1e6:9.2f} {r['checkpoint_bytes'] / 1e6:8.2f} "
                  f"{r['publish_s']['median']:10.4f} {r['receive_s']['median']:10.4f} "
                  f"{r['checkpoint_s']['median']:8.4f}")
        for r in result["exchange_7b"]:
            print(f"{r['version']:40s} {r['bytes'] / 1e6:9.1f} MB, ~{r['exchange_s_at_measured_rate']:.2f} s")
        write_result(result, args.out)
    if args.part in ("step", "both"):
        rows = step_time(args, lambda rows: write_result(result | {"step": rows, "step_partial": True,
                                                                  "load_average_now": os.getloadavg()}, args.out))
        result["step"] = rows
        print(f"\n{'role':6s} {'arm':24s} {'s/step median':>14s} {'min':>7s} {'max':>7s}")
        for r in rows:
            s = r["step_s"]
            print(f"{r['role']:6s} {r['arm']:24s} {s['median']:14.2f} {s['min']:7.2f} {s['max']:7.2f}")
    result["load_average_after"] = os.getloadavg()
    write_result(result, args.out)


if __name__ == "__main__":
    main()
