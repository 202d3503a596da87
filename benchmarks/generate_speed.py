"""Sampling speed: transformers ``model.generate`` vs apo_ray.models.fastgen.FastSampler, side by side.

A random-init model of a real shape (config built in code, bf16), ``--batch`` rows of
``--prompt`` random prompt tokens, ``--new`` sampled tokens each (temperature 1, top-p 1, no top-k;
EOS is masked with ``min_new_tokens`` in ``generate`` and absent in the fast path, so every row
generates exactly ``--new`` tokens in both). Each path: one warm-up call (graph capture /
compilation excluded), then the median of ``--repeats`` timed calls (``torch.cuda.synchronize``
around each). tok/s counts new tokens only; ms/step = call time / new tokens (prefill included).

Paths: ``baseline`` (generate, dynamic cache), ``fast`` (static cache + CUDA graph of the decode
step), ``fast-eager`` (the same step without a graph), ``fast-compile`` (torch.compile'd step,
then a CUDA graph); pick with ``--paths``.

    python benchmarks/generate_speed.py --shape qwen2.5-0.5b              # on the GPU
    python benchmarks/generate_speed.py --shape smollm2-135m --batch 64
    python benchmarks/generate_speed.py --shape smollm2-135m --device cpu --batch 4 --new 8 --prompt 16
"""

from __future__ import annotations

import argparse
import datetime
import platform
import statistics
import time
from pathlib import Path

import torch
from results_io import write_result


def model_config(shape: str):
    from transformers import LlamaConfig

    from apo_ray.models.loading import shape_config

    if shape == "tiny":
        return LlamaConfig(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                           num_key_value_heads=2, vocab_size=1000, tie_word_embeddings=True)
    return shape_config(shape)


def build_model(shape: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    return model.eval()


def _sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def time_calls(fn, device: str, repeats: int) -> tuple[float, float, list[float]]:
    """(first call seconds, median of `repeats` further calls, all timed seconds)."""
    _sync(device)
    t = time.perf_counter()
    fn()
    _sync(device)
    first = time.perf_counter() - t
    times = []
    for _ in range(repeats):
        t = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t)
    return first, statistics.median(times), times


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=["smollm2-135m", "qwen2.5-0.5b", "llama-7b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--dtype", default="bf16", choices=["bf16", "fp32"])
    ap.add_argument("--batch", type=int, default=256)
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--new", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--paths", default="baseline,fast,fast-eager",
                    help="comma list of baseline, fast, fast-eager, fast-compile")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/generate_<shape>.json)")
    args = ap.parse_args()
    import transformers

    from apo_ray.models.fastgen import FastSampler

    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    model = build_model(args.shape, dtype, args.device)
    gen = torch.Generator(device=args.device).manual_seed(0)
    ids = torch.randint(3, model.config.vocab_size, (args.batch, args.prompt), device=args.device, generator=gen)
    mask = torch.ones_like(ids)
    pad = 0

    def baseline():
        out = model.generate(input_ids=ids, attention_mask=mask, do_sample=True, temperature=1.0, top_p=1.0,
                             top_k=0, max_new_tokens=args.new, min_new_tokens=args.new, pad_token_id=pad)
        assert out.shape[1] == args.prompt + args.new

    def fast_path(**kwargs):
        sampler = FastSampler(model, max_batch=args.batch, max_len=args.prompt + args.new, **kwargs)

        def run():
            out = sampler.generate(ids, mask, max_new_tokens=args.new, temperature=1.0, top_p=1.0,
                                   eos_token_id=None, pad_token_id=pad, generator=gen)
            assert out.shape == (args.batch, args.new)
        return run

    makers = {"baseline": lambda: baseline, "fast": lambda: fast_path(use_cuda_graph=True),
              "fast-eager": lambda: fast_path(use_cuda_graph=False),
              "fast-compile": lambda: fast_path(use_cuda_graph=True, compile=True)}
    rows = []
    for name in [p.strip() for p in args.paths.split(",") if p.strip()]:
        first, median, times = time_calls(makers[name](), args.device, args.repeats)
        tokens = args.batch * args.new
        rows.append({"path": name, "batch": args.batch, "first_s": round(first, 3), "seconds": round(median, 4),
                     "times": [round(t, 4) for t in times], "tok_per_s": tokens / median,
                     "ms_per_step": 1000 * median / args.new})
        if args.device.startswith("cuda"):
            torch.cuda.empty_cache()
    base = next((r["tok_per_s"] for r in rows if r["path"] == "baseline"), None)
    print(f"{args.shape} {args.dtype} on {args.device}: batch {args.batch}, {args.prompt} prompt + {args.new} new tokens")
    print(f"{'path':<14}{'batch':>6}{'tok/s':>12}{'ms/step':>10}{'speedup':>9}{'first s':>9}")
    for r in rows:
        r["speedup"] = r["tok_per_s"] / base if base else None
        speed = f"{r['speedup']:.2f}x" if base else "-"
        print(f"{r['path']:<14}{r['batch']:>6}{r['tok_per_s']:>12,.0f}{r['ms_per_step']:>10.2f}{speed:>9}"
              f"{r['first_s']:>9.2f}")

    device_name = torch.cuda.get_device_name() if args.device.startswith("cuda") else platform.processor() or "cpu"
    best_fast = max((r for r in rows if r["path"].startswith("fast")), key=lambda r: r["tok_per_s"], default=None)
    result = {
        "benchmark": "generate_speed", "shape": args.shape, "dtype": args.dtype, "device": args.device,
        "device_name": device_name, "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "torch": torch.__version__, "transformers": transformers.__version__, "batch": args.batch,
        "prompt_tokens": args.prompt, "new_tokens": args.new, "repeats": args.repeats, "rows": rows,
        "generate_baseline_tok_per_s": base,
        "generate_tok_per_s": best_fast["tok_per_s"] if best_fast else None,
        "generate_best_path": best_fast["path"] if best_fast else None,
        "generate_speedup": (best_fast["tok_per_s"] / base) if best_fast and base else None,
    }
    write_result(result, args.out or Path(__file__).parent / "results" / f"generate_{args.shape}.json")


if __name__ == "__main__":
    main()
