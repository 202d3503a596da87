"""vLLM vs transformers (shared prefill) sampling on CPU, side by side in one run, and one vLLM reload.

    python benchmarks/vllm_vs_hf.py                      # SmolLM2-135M-Instruct, the demo's shape + a larger batch
    python benchmarks/vllm_vs_hf.py --model tiny-random-llama --prompts 8 32   # quick

For each batch size: the same HH prompts (chat template, cut to ``--prompt-tokens``), S samples each,
``--new-tokens`` at most, temperature 1; one warm-up call, then ``--repeats`` timed calls per backend,
the backends taking turns call by call; medians with their min-max and the load average of each call
(the machine is shared), and the ratio paired within each repeat.
Reports samples/s and generated tokens/s (the backends stop at EOS alike, so tokens differ a little).
Then ``--repeats`` weight reloads of the vLLM engine from a packed buffer (as the generator actor does after
``ray.get``): seconds and GB/s, split into the copy into shared memory and the engine's
``reload_weights``; beside it the transformers generator's in-place load of the same buffer.
Prints a table and writes ``benchmarks/results/vllm_vs_hf_cpu_<dtype>.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks.results_io import positive_int


def _timed(gens: dict, prompts, samples, decoding, repeats) -> list[dict]:
    """Each backend's samples/s on the same prompts, call by call. The backends take turns within
    every repeat, so a change in the machine's load (it is shared) hits both alike, and each repeat
    gives one paired ratio. Per backend: the median over the repeats and its min-max, every call's
    seconds and the 1-minute load average when it started."""
    calls = {name: [] for name in gens}
    for gen in gens.values():
        gen.generate(prompts[:2], samples, seed=0, decoding=decoding)  # warm-up
    for r in range(repeats):
        for name, gen in gens.items():
            load = os.getloadavg()[0]
            start = time.perf_counter()
            gen.generate(prompts, samples, seed=r + 1, decoding=decoding)
            seconds = time.perf_counter() - start
            calls[name].append({"seconds": seconds, "samples_per_s": len(prompts) * samples / seconds,
                                "new_tokens_per_s": gen.last_stats.new_tokens / seconds, "load_1min": load})
    rows = []
    for name, rs in calls.items():
        rate = [c["samples_per_s"] for c in rs]
        rows.append({"backend": name, "seconds": statistics.median(c["seconds"] for c in rs),
                     "samples_per_s": statistics.median(rate), "samples_per_s_min": min(rate),
                     "samples_per_s_max": max(rate),
                     "new_tokens_per_s": statistics.median(c["new_tokens_per_s"] for c in rs), "calls": rs})
    return rows


def paired_ratios(rows: list[dict], prompts: int) -> list[float]:
    """vLLM / transformers samples/s of each repeat (the two calls of a repeat ran back to back)."""
    hf_row, v_row = (r for r in rows if r["prompts"] == prompts)
    return [v["samples_per_s"] / h["samples_per_s"] for h, v in zip(hf_row["calls"], v_row["calls"])]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="smollm2-135m-instruct")
    ap.add_argument("--data", default=os.environ.get("APO_HH_DATA", str(ROOT.parent / "shared/data/hh-rlhf")))
    ap.add_argument("--prompts", type=positive_int, nargs="+", default=[16, 64], help="batch sizes (the demo: 16)")
    ap.add_argument("--samples", type=positive_int, default=4, help="S (the demo: 4)")
    ap.add_argument("--new-tokens", type=positive_int, default=24, help="the demo: 24")
    ap.add_argument("--prompt-tokens", type=positive_int, default=56, help="the demo: 56")
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--repeats", type=positive_int, default=5, help="alternating timed calls per backend, and reloads")
    ap.add_argument("--out", default=None, help="default: benchmarks/results/vllm_vs_hf_cpu_<dtype>.json")
    args = ap.parse_args()

    import torch

    from apo_ray.config import DecodingConfig
    from apo_ray.data import load_preference_pairs
    from apo_ray.models.generation import HFGenerator
    from apo_ray.models.loading import load_policy, resolve_dtype
    from apo_ray.models.vllm_generator import VLLMGenerator
    from apo_ray.models.weights import load_packed_into, pack_state_dict

    threads = len(os.sched_getaffinity(0))
    torch.set_num_threads(threads)
    dtype = resolve_dtype(args.dtype, "cpu")
    decoding = DecodingConfig(max_new_tokens=args.new_tokens, temperature=1.0)
    prompts = list(dict.fromkeys(p.prompt for p in load_preference_pairs(args.data, limit=4 * max(args.prompts))))
    common = {"decoding": decoding, "max_prompt_tokens": args.prompt_tokens, "dtype": dtype}

    hf = HFGenerator(args.model, prompts_per_batch=max(args.prompts), device="cpu", **common)
    start = time.perf_counter()
    vllm_gen = VLLMGenerator(args.model, max_model_len=args.prompt_tokens + args.new_tokens, **common)
    engine_start = time.perf_counter() - start

    rows = []
    load_before = os.getloadavg()
    for n in args.prompts:
        hf.prompts_per_batch = n
        for row in _timed({"transformers (shared prefill)": hf, "vLLM": vllm_gen}, prompts[:n], args.samples,
                          decoding, args.repeats):
            rows.append({"prompts": n, "samples": args.samples, **row})

    # One reload, the way a generator actor gets new weights: a packed buffer.
    state = load_policy(args.model, dtype=dtype).state_dict()
    with torch.no_grad():
        new = {k: v + 0.01 * torch.randn_like(v) for k, v in state.items()}
    packed = pack_state_dict(new)
    vllm_gen.load_packed(packed)  # warm: first reload
    reloads, hf_reloads = [], []
    for _ in range(args.repeats):  # alternating, as the sampling calls
        vllm_gen.load_packed(packed)
        reloads.append(dict(vllm_gen.last_reload))
        start = time.perf_counter()
        load_packed_into(hf.model, packed)
        hf_reloads.append(time.perf_counter() - start)
    vllm_gen.close()
    reload = {key: statistics.median(r[key] for r in reloads) for key in ("seconds", "write_seconds", "engine_seconds")}
    hf_reload = statistics.median(hf_reloads)

    gb = packed.total_bytes / 1e9
    result = {
        "model": args.model, "dtype": dtype, "threads": threads, "cpu": platform.processor() or platform.machine(),
        "prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "repeats": args.repeats,
        "vllm_engine_start_s": engine_start, "sampling": rows,
        "load_average_before_after": [load_before[0], os.getloadavg()[0]],  # a shared machine
        "load_average_1min_per_call": [c["load_1min"] for r in rows for c in r["calls"]],
        "reload": {"bytes": packed.total_bytes, "vllm_seconds": reload["seconds"],
                   "vllm_gb_per_s": gb / reload["seconds"], "vllm_shm_write_s": reload["write_seconds"],
                   "vllm_engine_reload_s": reload["engine_seconds"], "hf_in_place_seconds": hf_reload,
                   "hf_in_place_gb_per_s": gb / hf_reload, "statistic": "median over --repeats",
                   "vllm_seconds_all": [r["seconds"] for r in reloads], "hf_in_place_seconds_all": hf_reloads},
    }
    print(f"{args.model} ({dtype}, {threads} threads): {args.prompt_tokens}-token prompts, S={args.samples}, "
          f"<= {args.new_tokens} new tokens; vLLM engine start {engine_start:.1f} s")
    loads = [c["load_1min"] for r in rows for c in r["calls"]]
    print(f"medians over {args.repeats} alternating calls per backend [min-max]; 1-min load average during the "
          f"calls: median {statistics.median(loads):.1f} (min {min(loads):.1f}, max {max(loads):.1f})")
    print(f"{'backend':32} {'prompts':>7} {'s/call':>8} {'samples/s [min-max]':>22} {'tokens/s':>9}")
    for r in rows:
        spread = f"{r['samples_per_s']:.2f} [{r['samples_per_s_min']:.2f}-{r['samples_per_s_max']:.2f}]"
        print(f"{r['backend']:32} {r['prompts']:>7} {r['seconds']:>8.2f} {spread:>22} {r['new_tokens_per_s']:>9.1f}")
    for n in args.prompts:
        ratios = paired_ratios(rows, n)
        result.setdefault("ratio_vllm_over_hf", {})[str(n)] = {"median": statistics.median(ratios),
                                                               "min": min(ratios), "max": max(ratios), "all": ratios}
        print(f"  {n} prompts: vLLM / transformers = {statistics.median(ratios):.2f}x samples/s "
              f"(paired per repeat, min {min(ratios):.2f}x, max {max(ratios):.2f}x)")
    rl = result["reload"]
    print(f"reload {gb:.3f} GB (median of {args.repeats}): vLLM {rl['vllm_seconds']:.3f} s = {rl['vllm_gb_per_s']:.2f} GB/s "
          f"(shared-memory copy {rl['vllm_shm_write_s']:.3f} s, engine reload {rl['vllm_engine_reload_s']:.3f} s); "
          f"transformers in place {hf_reload:.3f} s = {rl['hf_in_place_gb_per_s']:.2f} GB/s")
    out = Path(args.out or ROOT / f"benchmarks/results/vllm_vs_hf_cpu_{dtype}.json")
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=2))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
