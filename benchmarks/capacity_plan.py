"""Capacity plan for ``experiment=paper_hh`` with 7B policy and RM: work per phase, memory per role,
GPU-hours per round, from the data's measured token lengths and the per-token costs measured on an
H100 (``benchmarks/results/*.json``), scaled to the LLaMA-7B shape. Prints the tables of
``docs/capacity.md`` and writes JSON.

What is measured and what is assumed (each number in the JSON says which):

- token lengths: the HH-RLHF harmless-base test split shipped in the package, tokenised with
  SmolLM2's tokenizer (LLaMA's own tokenizer is not available offline), cut at the preset's limits;
  padding measured by cutting the data into micro-batches the way the learners and scorers do;
- paper_hh sizes: the preset's (20.0K D_P pairs, 66.0K LLM queries, 10K dev, ~4.6K test pairs of
  the official test splits, ~86.3K training pairs for RM_Test); S = 4;
- sampled responses: the preset's caps (256 new tokens for the game's samples, 512 for test
  answers): an upper bound, a 7B policy at T = 1.2 stops earlier on many prompts;
- learner step: the MFU measured for Qwen2.5-0.5B's shape on one H100 (``train_mfu``), carried
  over to 7B on 8 GPUs (assumption: ZeRO-2/3 over NVLink overlaps its communication);
- forward-only scoring and prefill: the 39% MFU measured for a 0.5B forward (docs/design.md);
- decode: a bandwidth roofline (weights + KV cache read once per step at 3.35 TB/s) at an assumed
  50% efficiency: our own 0.5B measurement (``generate_speed``) runs at ~9% of its roofline, which
  is overhead-bound and does not carry to a memory-bound 7B; vLLM at 7B was not measured here;
- weight exchange: the packed object-store path measured at 6.1 GB/s into a GPU actor (0.5B state
  dict) scaled linearly with bytes; a version is handed back in fp32 (27 GB at 7B);
- checkpoint: ``PhaseStore.put_weights`` measured at 0.18 GB/s on the CPU machine's disk.

    python benchmarks/capacity_plan.py
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import time
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
H100_BF16_FLOPS = 989e12
H100_HBM_BYTES_S = 3.35e12
DECODE_EFFICIENCY = 0.5  # assumed (see the module docstring)
# paper_hh's sizes (conf/experiment/paper_hh.yaml): pairs and queries after cleaning
SIZES = {"train_pairs": 86_300, "rm_pairs": 20_000, "llm_queries": 66_000, "dev_pairs": 10_000, "test_pairs": 4_600}
S = 4
LIMITS = {"prompt": 768, "rm_seq": 512, "policy_seq": 1024, "sample_new": 256, "test_new": 512}
MICRO = {"rm_pairs": 8, "policy_seqs": 8, "score_batch": 32}
ARMS = ("fixed", "apo", "apo_seq", "ablation")


def model_numbers(shape: str) -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from apo_ray.models.loading import shape_config

    config = shape_config(shape)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    params = sum(p.numel() for p in model.parameters())
    embed = model.get_input_embeddings().weight.numel()
    matmul = params - embed - sum(p.numel() for n, p in model.named_parameters() if "norm" in n)
    head_dim = config.hidden_size // config.num_attention_heads
    return {"shape": shape, "params": params, "matmul_params": matmul, "layers": config.num_hidden_layers,
            "hidden": config.hidden_size, "heads": config.num_attention_heads, "head_dim": head_dim,
            "kv_bytes_per_token_bf16": 2 * config.num_hidden_layers * config.num_key_value_heads * head_dim * 2,
            "largest_tensor_params": max(p.numel() for p in model.parameters()),
            "layer_params": sum(p.numel() for p in model.model.layers[0].parameters())}


def token_lengths(data: str, seed: int = 0) -> dict:
    """Mean tokens (and micro-batch padding) of prompts and chosen responses of the data."""
    from apo_ray.data import load_preference_pairs
    from apo_ray.models.loading import load_tokenizer

    tok = load_tokenizer("smollm2-135m-instruct")
    pairs = list(load_preference_pairs(data))
    prompt = [min(len(tok(p.prompt, add_special_tokens=False).input_ids), LIMITS["prompt"]) for p in pairs]
    chosen = [len(tok(p.chosen, add_special_tokens=False).input_ids) for p in pairs]

    def padded_mean(lengths: list[int], micro: int, by_length: bool = False) -> float:
        """Tokens per sequence once padded to the longest of its micro-batch: random batches (the
        learners' shuffled steps) or batches of similar length (the pools' ``batches_by_length``)."""
        order = sorted(lengths) if by_length else lengths[:]
        if not by_length:
            random.Random(seed).shuffle(order)
        batches = [order[i:i + micro] for i in range(0, len(order), micro)]
        return sum(len(b) * max(b) for b in batches) / len(order)

    rm_seq = [min(p + c, LIMITS["rm_seq"]) for p, c in zip(prompt, chosen)]  # D_P / dev / test sequences
    sample_rm_seq = [min(p + LIMITS["sample_new"], LIMITS["rm_seq"]) for p in prompt]  # (x, sample) scored / trained
    policy_seq = [min(p + LIMITS["sample_new"], LIMITS["policy_seq"]) for p in prompt]
    return {"pairs": len(pairs), "tokenizer": "SmolLM2-135M (49K BPE; LLaMA's 32K SentencePiece not available offline)",
            "prompt_mean": statistics.mean(prompt), "chosen_mean": statistics.mean(chosen),
            "rm_seq_mean": statistics.mean(rm_seq), "rm_seq_padded": padded_mean(rm_seq, 2 * MICRO["rm_pairs"]),
            "rm_seq_sorted": padded_mean(rm_seq, MICRO["score_batch"], by_length=True),
            "sample_rm_seq_padded": padded_mean(sample_rm_seq, 2 * MICRO["rm_pairs"]),
            "score_seq_padded": padded_mean(sample_rm_seq, MICRO["score_batch"], by_length=True),
            "policy_seq_padded": padded_mean(policy_seq, MICRO["policy_seqs"])}


def mfus() -> dict:
    rows = {r["variant"]: r["mfu"] for r in json.loads((RESULTS / "train_mfu_qwen2.5-0.5b.json").read_text())["rows"]}
    return {"train_bf16": rows["bf16"], "train_autocast": rows["baseline"], "train_bf16_compile": rows["bf16+compile"],
            "forward": 0.39}


def phase_work(m: dict, t: dict, mfu: dict, kv_budget_gb: float = 60.0) -> dict[str, dict]:
    """GPU-seconds (H100) of each kind of phase, once, at paper_hh's sizes; a generator has
    ``kv_budget_gb`` of GPU memory for its KV cache (it bounds the decode batch)."""
    n = m["matmul_params"]

    def attn(seq: float) -> float:  # attention FLOPs per token, forward + backward (PaLM's count)
        return 12 * m["layers"] * m["heads"] * m["head_dim"] * seq

    def train_flops(seq: float) -> float:  # fwd + bwd (6N) + the recomputed forward of checkpointing (2N)
        return 8 * n + attn(seq) * 4 / 3

    def fwd_flops(seq: float) -> float:
        return 2 * n + attn(seq) / 3

    def train(seqs: float, seq_len: float) -> dict:
        tokens = seqs * seq_len
        return {"tokens": tokens, "gpu_s": tokens * train_flops(seq_len) / (H100_BF16_FLOPS * mfu["train_bf16"])}

    def forward(seqs: float, seq_len: float) -> dict:
        tokens = seqs * seq_len
        return {"tokens": tokens, "gpu_s": tokens * fwd_flops(seq_len) / (H100_BF16_FLOPS * mfu["forward"])}

    def generate(prompts: float, n_samples: int, new_tokens: int) -> dict:
        prefill = forward(prompts, t["prompt_mean"])  # one prefill per prompt, shared by its n samples
        ctx = t["prompt_mean"] + new_tokens / 2  # mean context over the decode
        # as many sequences as the generator's KV cache holds at their full length, at most 256
        batch = max(1, min(256, int(kv_budget_gb * 1e9 / ((t["prompt_mean"] + new_tokens) * m["kv_bytes_per_token_bf16"]))))
        step_s = (2 * m["params"] + batch * ctx * m["kv_bytes_per_token_bf16"]) / (H100_HBM_BYTES_S * DECODE_EFFICIENCY)
        steps = prompts * n_samples / batch * new_tokens
        return {"tokens": prompts * n_samples * new_tokens, "gpu_s": prefill["gpu_s"] + steps * step_s,
                "decode_batch": batch, "decode_ms_per_step": 1e3 * step_s}

    q, g = SIZES["llm_queries"], SIZES["rm_pairs"]
    pair_seq = (t["rm_seq_padded"] + t["sample_rm_seq_padded"]) / 2  # an APO pair: (gold, sample)
    return {
        "sample_gold": generate(g, S, LIMITS["sample_new"]),
        "train_rm_apo": train(2 * (g * S + g), pair_seq),
        "train_rm_dp": train(2 * g, t["rm_seq_padded"]),
        "sample_queries": generate(q, S, LIMITS["sample_new"]),
        "score_samples": forward(q * S, t["score_seq_padded"]),
        "train_policy": train(q, t["policy_seq_padded"]),
        "evaluate_rm": forward(2 * (SIZES["dev_pairs"] + SIZES["test_pairs"]), t["rm_seq_sorted"]),
        "evaluate_answers": generate(SIZES["test_pairs"], 1, LIMITS["test_new"]),
        "evaluate_score": forward(SIZES["test_pairs"], t["score_seq_padded"]),
        "train_rm_test": train(2 * SIZES["train_pairs"], t["rm_seq_padded"]),
    }


def round_gpu_hours(work: dict) -> dict:
    """GPU-hours of one later round (2 or 3: no arm shares a phase) per arm, and of round 1."""
    eval_ = work["evaluate_answers"]["gpu_s"] + work["evaluate_score"]["gpu_s"]
    per_arm = {
        "fixed": work["sample_queries"]["gpu_s"] + work["score_samples"]["gpu_s"] + work["train_policy"]["gpu_s"] + eval_,
        "apo": work["sample_gold"]["gpu_s"] + work["train_rm_apo"]["gpu_s"] + work["sample_queries"]["gpu_s"]
        + work["score_samples"]["gpu_s"] + work["train_policy"]["gpu_s"] + work["evaluate_rm"]["gpu_s"] + eval_,
        "ablation": work["train_rm_dp"]["gpu_s"] + work["sample_queries"]["gpu_s"] + work["score_samples"]["gpu_s"]
        + work["train_policy"]["gpu_s"] + work["evaluate_rm"]["gpu_s"] + eval_,
    }
    per_arm["apo_seq"] = per_arm["apo"]
    # round 1: every arm samples the same initial policy (computed once); apo_seq is apo
    round1 = per_arm["fixed"] + per_arm["apo"] + per_arm["ablation"] - 2 * work["sample_queries"]["gpu_s"]
    setup = work["train_rm_dp"]["gpu_s"] + work["train_rm_test"]["gpu_s"] + work["evaluate_rm"]["gpu_s"] + eval_
    return {"per_arm_h": {k: v / 3600 for k, v in per_arm.items()}, "round_h": sum(per_arm.values()) / 3600,
            "round1_h": round1 / 3600, "setup_h": setup / 3600}


KINDS = {"train": ("train_rm_apo", "train_rm_dp", "train_policy", "train_rm_test"),
         "generate": ("sample_gold", "sample_queries", "evaluate_answers"),
         "score": ("score_samples", "evaluate_rm", "evaluate_score")}


# How often each phase runs: in the setup (RM_Base, RM_Test, round-0 evaluation), in round 1 (every
# arm samples the initial policy, computed once; apo_seq is apo) and in every later round.
PHASE_COUNTS = {
    "setup": {"train_rm_dp": 1, "train_rm_test": 1, "evaluate_rm": 1, "evaluate_answers": 1, "evaluate_score": 1},
    "round1": {"sample_gold": 1, "train_rm_apo": 1, "train_rm_dp": 1, "sample_queries": 1, "score_samples": 3,
               "train_policy": 3, "evaluate_rm": 2, "evaluate_answers": 3, "evaluate_score": 3},
    "later_round": {"sample_gold": 2, "train_rm_apo": 2, "train_rm_dp": 1, "sample_queries": 4, "score_samples": 4,
                    "train_policy": 4, "evaluate_rm": 3, "evaluate_answers": 4, "evaluate_score": 4},
}


def by_kind(work: dict, part: str) -> dict[str, float]:
    """GPU-seconds of a part of the run (``PHASE_COUNTS``), by kind of work."""
    count = PHASE_COUNTS[part]
    return {kind: sum(count.get(name, 0) * work[name]["gpu_s"] for name in names) for kind, names in KINDS.items()}


# Layouts: GPUs for the learner group and for the pools (generators and scorers share theirs), and
# the generator's KV-cache room. Co-located roles share GPUs through fractional GPU resources.
LAYOUTS = [
    {"name": "8 GPUs, 1 node, all roles co-located", "gpus": 8, "learner_gpus": 8, "pool_gpus": 8, "kv_budget_gb": 20,
     "settings": "learner_workers=8 learner_gpus=0.4 learner_strategy=deepspeed deepspeed_stage=3 (or fsdp) "
                 "learner_placement=STRICT_PACK num_generators=8 generator_gpus=0.4 num_scorers=8 scorer_gpus=0.2 "
                 "generation.engine_kwargs.gpu_memory_utilization=0.42"},
    {"name": "16 GPUs, 2 nodes", "gpus": 16, "learner_gpus": 8, "pool_gpus": 16, "kv_budget_gb": 20,
     "settings": "learner_workers=8 learner_gpus=0.4 deepspeed_stage=3 learner_placement=STRICT_PACK "
                 "num_generators=16 generator_gpus=0.4 num_scorers=16 scorer_gpus=0.2 (node B: pools only, "
                 "or generator_gpus=0.8 there)"},
    {"name": "64 GPUs, 8 nodes", "gpus": 64, "learner_gpus": 16, "pool_gpus": 64, "kv_budget_gb": 20,
     "settings": "learner_workers=16 learner_gpus=0.4 deepspeed_stage=3 learner_placement=PACK (2 nodes) "
                 "num_generators=64 generator_gpus=0.4 num_scorers=64 scorer_gpus=0.2 "
                 "rm.micro_pairs=4 (64 pairs per step over 16 ranks)"},
]


def layout_hours(m: dict, t: dict, mfu: dict, save_s_per_version: float, rounds: int = 3) -> list[dict]:
    """Wall hours per layout: the game runs its phases one after another, each on the GPUs of its
    role (learner phases scale with the learner GPUs, pools with the pool GPUs); every trained
    version is checkpointed (3 RMs and 4 policies in a later round)."""
    versions = {"setup": 2, "round1": 5, "later_round": 7}
    rows = []
    for layout in LAYOUTS:
        work = phase_work(m, t, mfu, layout["kv_budget_gb"])
        hours = {}
        for part in PHASE_COUNTS:
            kinds = by_kind(work, part)
            compute = (kinds["train"] / layout["learner_gpus"]
                       + (kinds["generate"] + kinds["score"]) / layout["pool_gpus"]) / 3600
            hours[part] = {"compute_h": compute, "checkpoint_h": versions[part] * save_s_per_version / 3600,
                           "gpu_busy_share": sum(kinds.values()) / 3600 / layout["gpus"] / compute}
            hours[part]["wall_h"] = hours[part]["compute_h"] + hours[part]["checkpoint_h"]
        total = hours["setup"]["wall_h"] + hours["round1"]["wall_h"] + (rounds - 1) * hours["later_round"]["wall_h"]
        rows.append(layout | {"hours": hours, "run_h": total, "rounds": rounds})
    return rows


def memory(m: dict, t: dict) -> dict:
    """GB per GPU / host / object store of each role, bf16 weights, 7B."""
    p = m["params"]
    gb = 1e9
    act_rm = 2 * MICRO["rm_pairs"] * LIMITS["rm_seq"] * m["hidden"] * 2 * m["layers"] / gb  # checkpointed layer inputs
    act_policy = MICRO["policy_seqs"] * LIMITS["policy_seq"] * m["hidden"] * 2 * m["layers"] / gb
    logits = MICRO["policy_seqs"] * LIMITS["policy_seq"] * 32000 * 4 * 2 / gb  # fp32 logits + their gradient

    def learner(n: int, stage: int) -> float:
        states = 16 * p / n if stage == 3 else 2 * p + 14 * p / n  # bf16 params+grads, fp32 master + Adam m, v
        return states / gb

    weights = 2 * p / gb
    return {
        "weights_bf16_gb": weights, "weights_fp32_gb": 2 * weights,
        "learner_gpu_gb": {f"zero{stage}_{n}gpu": learner(n, stage) for stage in (2, 3) for n in (4, 8, 16)},
        "learner_activations_gb": {"rm": act_rm, "policy": act_policy + logits},
        "learner_gathered_gb": 2 * 2 * m["layer_params"] / gb,  # the unit being used and the one prefetched
        "ddp_gpu_gb": 16 * p / gb,
        "learner_host_per_rank_gb": weights, "learner_rank0_pack_buffer_gb": weights,
        "generator_gpu_gb": {"weights": weights, "kv_cache_per_1k_tokens": 1000 * m["kv_bytes_per_token_bf16"] / gb},
        "scorer_gpu_gb": weights,
        "object_store_versions_alive": 2 + 2 * len(ARMS) - 1,  # RM_Base, RM_Test, each arm's RM + policy (fixed: RM_Base)
    }


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default="embedded:hh-rlhf-harmless-test")
    ap.add_argument("--shape", default="llama-7b")
    ap.add_argument("--out", default=str(RESULTS / "capacity_plan_paper_hh_7b.json"))
    args = ap.parse_args()
    m, t, mfu = model_numbers(args.shape), token_lengths(args.data), mfus()
    work = phase_work(m, t, mfu)
    hours = round_gpu_hours(work)
    mem = memory(m, t)
    sync = json.loads((RESULTS / "weight_sync_cuda.json").read_text())
    packed = next(r for r in sync["results"] if r["method"] == "packed")["gb_per_s"]
    store = json.loads((RESULTS / "phase_store_cpu.json").read_text())  # the checkpoint's write, on the CPU box
    save_gb_s = store["bytes"] / 1e9 / store["median_seconds"]["put_weights"]
    version_gb = 4 * m["params"] / 1e9  # learners hand back fp32 (their master weights)
    save_s = version_gb / save_gb_s
    layouts = layout_hours(m, t, mfu, save_s)
    print(f"{args.shape}: {m['params'] / 1e9:.2f}B parameters, KV cache {m['kv_bytes_per_token_bf16'] / 2**20:.2f} MiB/token")
    print(f"tokens (mean, {t['pairs']} HH pairs): prompt {t['prompt_mean']:.0f}, chosen {t['chosen_mean']:.0f}; padded "
          f"RM seq {t['rm_seq_padded']:.0f}, policy seq {t['policy_seq_padded']:.0f}")
    print(f"\n{'phase (once)':<18} {'tokens':>10} {'H100 GPU-h':>11}")
    for name, w in work.items():
        print(f"{name:<18} {w['tokens'] / 1e6:>9.1f}M {w['gpu_s'] / 3600:>11.2f}")
    print(f"\nGPU-hours: setup {hours['setup_h']:.1f}, round 1 {hours['round1_h']:.1f}, later rounds {hours['round_h']:.1f} "
          f"({', '.join(f'{k} {v:.1f}' for k, v in hours['per_arm_h'].items())})")
    print(f"a version as handed back: {version_gb:.1f} GB (fp32); into a GPU actor ~{version_gb / packed:.1f} s at the "
          f"measured {packed:.1f} GB/s; checkpointed in ~{save_s:.0f} s at {save_gb_s:.2f} GB/s")
    print(f"\n{'layout (wall hours)':<40} {'setup':>6} {'round 1':>8} {'later':>6} {'ckpt':>5} {'busy':>5} "
          f"{'3 rounds':>9}")
    for row in layouts:
        h = row["hours"]
        print(f"{row['name']:<40} {h['setup']['wall_h']:>6.2f} {h['round1']['wall_h']:>8.2f} "
              f"{h['later_round']['wall_h']:>6.2f} {h['later_round']['checkpoint_h']:>5.2f} "
              f"{100 * h['later_round']['gpu_busy_share']:>4.0f}% {row['run_h']:>9.1f}")
    result = {"benchmark": "capacity_plan", "date": time.strftime("%Y-%m-%d"), "model": m, "tokens": t, "mfu": mfu,
              "decode_efficiency_assumed": DECODE_EFFICIENCY, "sizes": SIZES, "limits": LIMITS, "micro": MICRO,
              "work": work, "gpu_hours": hours, "memory": mem, "weight_sync_gb_per_s": packed,
              "checkpoint_gb_per_s": save_gb_s, "layouts": layouts,
              "sources": ["benchmarks/results/train_mfu_qwen2.5-0.5b.json", "benchmarks/results/weight_sync_cuda.json",
                          "benchmarks/results/phase_store_cpu.json", "docs/design.md (forward MFU)"]}
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
