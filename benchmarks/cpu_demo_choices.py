"""The CPU demo's speed choices, each measured against its alternative in the same run, on the real
SmolLM2-135M-Instruct and real HH prompts, one process, this machine's cores:

- sampling S responses per prompt: the prompt prefilled once and shared by its S samples
  (``HFGenerator(share_prefill=True)``, the default) vs S separate prefills (``generate``'s own
  ``num_return_sequences``);
- RM learner fwd+bwd: all 30 blocks trained vs the top ``--trainable-layers`` (``rm.trainable_layers``);
- matmul throughput in fp32 vs bf16 (what ``dtype: auto`` decides from).

    python benchmarks/cpu_demo_choices.py
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # runs from a checkout without the package installed, as the other benchmarks

MODEL = "smollm2-135m-instruct"


def matmul_gflops(dtype: torch.dtype, n: int = 1024, repeats: int = 3) -> float:
    a, b = torch.randn(n, n, dtype=dtype), torch.randn(n, n, dtype=dtype)
    a @ b
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * n**3 * repeats / (time.perf_counter() - start) / 1e9


def sampling(prompts: list[str], samples: int, new_tokens: int, prompt_tokens: int) -> list[dict]:
    from apo_ray.config import DecodingConfig
    from apo_ray.models.generation import HFGenerator

    gen = HFGenerator(MODEL, decoding=DecodingConfig(max_new_tokens=new_tokens), max_prompt_tokens=prompt_tokens,
                      prompts_per_batch=len(prompts), dtype="auto", device="cpu")
    gen.generate(prompts[:2], 2, seed=0)  # warm-up
    rows = []
    for shared in (False, True):
        gen.share_prefill = shared
        start = time.perf_counter()
        gen.generate(prompts, samples, seed=1)
        seconds = time.perf_counter() - start
        rows.append({"path": "shared prefill" if shared else "S prefills", "seconds": seconds,
                     "samples_per_s": len(prompts) * samples / seconds,
                     "new_tokens_per_s": gen.last_stats.new_tokens / seconds})
    for r in rows:
        r["speedup"] = rows[0]["seconds"] / r["seconds"]
    return rows


def rm_learner(pairs, trainable_layers: int, max_length: int) -> list[dict]:
    from apo_ray.data import RankedPair
    from apo_ray.models.training import TrainSettings, train_reward_model

    ranked = [RankedPair.from_preference(p) for p in pairs]
    rows = []
    for layers in (None, trainable_layers):
        settings = TrainSettings(lr=1e-5, examples_per_step=8, micro_examples=8, max_length=max_length,
                                 precision="auto", trainable_layers=layers)
        _, stats = train_reward_model(MODEL, None, ranked, settings)
        rows.append({"trainable_layers": layers or "all", "precision": stats["precision"],
                     "train_s": stats["seconds"], "tokens_per_s": stats["tokens_per_s"]})
    for r in rows:
        r["speedup"] = r["tokens_per_s"] / rows[0]["tokens_per_s"]
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="embedded:hh-rlhf-harmless-test")
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--samples", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=24)
    ap.add_argument("--prompt-tokens", type=int, default=56)
    ap.add_argument("--pairs", type=int, default=16)
    ap.add_argument("--max-length", type=int, default=80)
    ap.add_argument("--trainable-layers", type=int, default=4)
    ap.add_argument("--out", default="benchmarks/results/cpu_demo_choices.json")
    args = ap.parse_args()

    from apo_ray.data import load_preference_pairs
    from apo_ray.models.loading import has_fast_bf16

    pairs = load_preference_pairs(args.data, limit=max(args.prompts, args.pairs))
    matmul = {"fp32_gflops": matmul_gflops(torch.float32), "bf16_gflops": matmul_gflops(torch.bfloat16, repeats=1),
              "has_fast_bf16": has_fast_bf16("cpu")}
    print(f"1024^2 matmul: fp32 {matmul['fp32_gflops']:.0f} GFLOP/s, bf16 {matmul['bf16_gflops']:.1f} GFLOP/s "
          f"-> dtype auto = {'bf16' if matmul['has_fast_bf16'] else 'fp32'}")
    sample_rows = sampling([p.prompt for p in pairs[:args.prompts]], args.samples, args.new_tokens, args.prompt_tokens)
    print(f"\nsampling {args.prompts} prompts x {args.samples} x {args.new_tokens} tokens "
          f"(prompts cut to {args.prompt_tokens} tokens)")
    print(f"{'path':<16} {'seconds':>8} {'samples/s':>10} {'tok/s':>7} {'speedup':>8}")
    for r in sample_rows:
        print(f"{r['path']:<16} {r['seconds']:>8.1f} {r['samples_per_s']:>10.2f} {r['new_tokens_per_s']:>7.1f} "
              f"{r['speedup']:>7.2f}x")
    learner_rows = rm_learner(pairs[:args.pairs], args.trainable_layers, args.max_length)
    print(f"\nRM learner, {args.pairs} pairs, max length {args.max_length}")
    print(f"{'trained blocks':<15} {'precision':<10} {'seconds':>8} {'tok/s':>7} {'speedup':>8}")
    for r in learner_rows:
        print(f"{r['trainable_layers']!s:<15} {r['precision']:<10} {r['train_s']:>8.1f} {r['tokens_per_s']:>7.0f} "
              f"{r['speedup']:>7.2f}x")
    result = {"benchmark": "cpu_demo_choices", "date": time.strftime("%Y-%m-%d"), "host": platform.node(),
              "processor": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
              "torch": torch.__version__, "args": vars(args), "matmul": matmul, "sampling": sample_rows,
              "rm_learner": learner_rows}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
