"""Learner throughput and MFU: causal-LM train steps (fwd + bwd + fused AdamW) of a random-init
model of a real shape on ``--batch`` x ``--seq`` random tokens, several variants in one run.

Variants (``--variants``, comma list; names are ``+``-joined features):
  baseline                  fp32 master weights, torch.autocast(bf16), ``model(ids, labels=ids).loss``,
                            fused AdamW: the plain loop of design.md / apo_ray.models.training
  bf16                      bf16 weights (and AdamW states), same loss
  bf16+compile              ``torch.compile(model)``
  bf16+compile+chunked-ce   compiled backbone; the loss never materialises the [tokens, vocab] fp32
                            logits: :class:`LinearCrossEntropy` computes lm_head + CE + their gradients
                            chunk by chunk in the forward (the gradient is stored, backward only scales)
  any of them + ``+gc``     gradient checkpointing (``--gradient-checkpointing`` appends the last
                            variant with +gc); recomputation is not counted as useful FLOPs
The loss is HF's: mean over the batch*(seq-1) next-token targets (checked against
``model(labels=...)`` on the first step with ``--check``).

FLOPs per token (fwd + bwd), the PaLM-appendix convention:
    6 * N_matmul + 12 * n_layers * (n_heads * head_dim) * seq
N_matmul: weights of every ``nn.Linear`` (q/k/v/o, MLP, and lm_head: a tied embedding counts once,
as the lm_head matmul; the embedding lookup is free); the second term is QK^T and AV over the
full seq x seq square (causal masking not discounted). MFU = tokens/s * FLOPs per token / peak,
peak = ``--peak-tflops`` (H100 SXM dense bf16: 989). ``mfu_anchor`` is design.md's anchor convention,
6 * (all parameters, a tied embedding counted twice), no attention term: the 29% baseline anchor
for Qwen2.5-0.5B's shape was computed that way (it reads ~0.8x lower under the formula above).

Timing: ``--warmup`` steps (compilation) excluded, then ``--steps`` steps between
``torch.cuda.synchronize`` calls.

    python benchmarks/train_mfu.py --shape qwen2.5-0.5b                       # on the GPU
    python benchmarks/train_mfu.py --shape qwen2.5-0.5b --gradient-checkpointing
    python benchmarks/train_mfu.py --shape tiny --device cpu --batch 2 --seq 64 --steps 2 --check
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import platform
import sys
import time
from pathlib import Path

import torch
from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parent))
from generate_speed import model_config
from results_io import write_result


class LinearCrossEntropy(torch.autograd.Function):
    """mean CE of ``hidden @ weight.T`` against ``targets`` (-100 ignored), chunk by chunk over
    tokens. Forward computes the gradients too (softmax - onehot), so no logits are kept for backward:
    peak extra memory is one [chunk, vocab] fp32 block instead of [tokens, vocab] in bf16 and fp32."""

    @staticmethod
    def forward(ctx, hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, chunk: int):
        valid_all = targets != -100
        n_valid = valid_all.sum().clamp(min=1).float()
        grad_h = torch.empty_like(hidden)
        grad_w = torch.zeros_like(weight, dtype=torch.float32) if weight.requires_grad else None
        loss = torch.zeros((), dtype=torch.float32, device=hidden.device)
        for lo in range(0, hidden.shape[0], chunk):
            h, t = hidden[lo:lo + chunk], targets[lo:lo + chunk]
            valid = valid_all[lo:lo + chunk]
            idx = t.clamp(min=0)[:, None]
            logits = (h @ weight.t()).float()  # [c, V]
            lse = logits.logsumexp(-1)
            loss += ((lse - logits.gather(1, idx)[:, 0]) * valid).sum()
            g = logits.sub_(lse[:, None]).exp_()  # softmax, in place
            g.scatter_add_(1, idx, torch.full_like(idx, -1, dtype=g.dtype))
            g.mul_((valid.float() / n_valid)[:, None])
            g = g.to(hidden.dtype)
            grad_h[lo:lo + chunk] = g @ weight
            if grad_w is not None:
                grad_w += (g.t() @ h).float()
        ctx.save_for_backward(grad_h, grad_w if grad_w is not None else torch.empty(0))
        ctx.has_w, ctx.w_dtype = grad_w is not None, weight.dtype
        return loss / n_valid

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        gw = (grad_w * grad_out).to(ctx.w_dtype) if ctx.has_w else None
        return grad_h * grad_out.to(grad_h.dtype), gw, None, None


def linear_cross_entropy(hidden, weight, targets, chunk: int = 2048):
    return LinearCrossEntropy.apply(hidden, weight, targets, chunk)


def check_linear_cross_entropy() -> float:
    """Loss and gradients of :func:`linear_cross_entropy` vs ``F.cross_entropy`` (fp32, with ignored
    targets and a ragged last chunk); returns the largest abs difference."""
    g = torch.Generator().manual_seed(0)
    h = torch.randn(37, 16, generator=g, requires_grad=True)
    w = torch.randn(50, 16, generator=g, requires_grad=True)
    t = torch.randint(0, 50, (37,), generator=g)
    t[::5] = -100
    ref = torch.nn.functional.cross_entropy(h @ w.t(), t, ignore_index=-100)
    ref_h, ref_w = torch.autograd.grad(2 * ref, (h, w))
    got = linear_cross_entropy(h, w, t, chunk=8)
    got_h, got_w = torch.autograd.grad(2 * got, (h, w))
    diff = max(float((a - b).detach().abs().max()) for a, b in [(got, ref), (got_h, ref_h), (got_w, ref_w)])
    assert diff < 1e-5, diff
    return diff


def causal_targets(input_ids: torch.Tensor) -> torch.Tensor:
    """HF's shift: position t predicts token t+1; the last position of each row is ignored."""
    pad = torch.full_like(input_ids[:, :1], -100)
    return torch.cat([input_ids[:, 1:], pad], dim=1).reshape(-1)


def flops_per_token(model, seq: int) -> tuple[float, float, int]:
    """(PaLM-convention FLOPs per token, design.md-anchor FLOPs per token, N_matmul)."""
    cfg = model.config
    n_matmul = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
    attention = 12 * cfg.num_hidden_layers * cfg.num_attention_heads * head_dim * seq
    n_all = sum(p.numel() for p in model.parameters())
    if getattr(cfg, "tie_word_embeddings", False):
        n_all += model.get_input_embeddings().weight.numel()
    return 6 * n_matmul + attention, 6 * n_all, n_matmul


def build(shape: str, dtype: torch.dtype, device: str):
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    with torch.device(device):
        model = AutoModelForCausalLM.from_config(model_config(shape), dtype=dtype)
    return model.train()


def run_variant(name: str, args, input_ids: torch.Tensor) -> dict:
    features = set(name.split("+"))
    unknown = features - {"baseline", "bf16", "compile", "chunked-ce", "gc"}
    if unknown or not features & {"baseline", "bf16"}:
        raise ValueError(f"variant {name!r}: use baseline|bf16 [+compile] [+chunked-ce] [+gc]")
    if {"baseline", "chunked-ce"} <= features:
        raise ValueError("chunked-ce works on bf16 weights (the baseline's autocast would recast its matmuls)")
    cuda = args.device.startswith("cuda")
    dtype = torch.float32 if "baseline" in features else torch.bfloat16
    model = build(args.shape, dtype, args.device)
    if "gc" in features:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    opt = torch.optim.AdamW(model.parameters(), lr=1e-5, weight_decay=0.0, fused=cuda)
    autocast = (torch.autocast(device_type="cuda" if cuda else "cpu", dtype=torch.bfloat16)
                if "baseline" in features else contextlib.nullcontext())
    targets = causal_targets(input_ids)
    if "chunked-ce" in features:
        backbone = getattr(model, model.base_model_prefix)
        backbone_fn = torch.compile(backbone) if "compile" in features else backbone
        head = model.get_output_embeddings()

        def loss_fn():
            hidden = backbone_fn(input_ids=input_ids, use_cache=False).last_hidden_state
            return linear_cross_entropy(hidden.reshape(-1, hidden.shape[-1]), head.weight, targets, args.ce_chunk)
    else:
        model_fn = torch.compile(model) if "compile" in features else model

        def loss_fn():
            return model_fn(input_ids=input_ids, labels=input_ids, use_cache=False).loss

    check = None
    if args.check:
        with torch.no_grad(), autocast:
            ref = float(model(input_ids=input_ids, labels=input_ids, use_cache=False).loss)
            got = float(loss_fn())
        check = {"loss": got, "hf_loss": ref, "abs_diff": abs(got - ref)}
        tol = 2e-2 if dtype == torch.bfloat16 else 1e-3
        assert abs(got - ref) < tol * max(1.0, abs(ref)), check

    def step():
        opt.zero_grad(set_to_none=True)
        with autocast:
            loss = loss_fn()
        loss.backward()
        opt.step()
        return loss

    sync = torch.cuda.synchronize if cuda else (lambda: None)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(args.warmup):
        step()
    sync()
    warm_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    for _ in range(args.steps):
        loss = step()
    sync()
    seconds = time.perf_counter() - t0
    tokens = args.batch * args.seq * args.steps
    fpt, fpt_anchor, n_matmul = flops_per_token(model, args.seq)
    tok_s = tokens / seconds
    row = {"variant": name, "tok_per_s": tok_s, "step_s": seconds / args.steps, "warmup_s": warm_s,
           "mfu": tok_s * fpt / (args.peak_tflops * 1e12), "mfu_anchor": tok_s * fpt_anchor / (args.peak_tflops * 1e12),
           "loss": float(loss.detach()), "flops_per_token": fpt, "n_matmul_params": n_matmul,
           "peak_mem_gb": torch.cuda.max_memory_allocated() / 1e9 if cuda else None, "check": check}
    return row


def run_isolated(name: str, args, input_ids: torch.Tensor) -> dict:
    row = run_variant(name, args, input_ids)  # its model, optimiser and compiled graphs die here
    gc.collect()
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    torch._dynamo.reset()
    return row


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", default="qwen2.5-0.5b", choices=["smollm2-135m", "qwen2.5-0.5b", "tiny"])
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--seq", type=int, default=512)
    ap.add_argument("--steps", type=int, default=10)
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="H100 SXM dense bf16: 989")
    ap.add_argument("--variants", default="baseline,bf16,bf16+compile,bf16+compile+chunked-ce")
    ap.add_argument("--gradient-checkpointing", action="store_true", help="also run the last variant +gc")
    ap.add_argument("--ce-chunk", type=int, default=2048, help="tokens per chunk of the chunked CE")
    ap.add_argument("--check", action="store_true", help="compare each variant's loss with HF's on step 0")
    ap.add_argument("--out", default=None, help="JSON path (default benchmarks/results/train_mfu_<shape>.json)")
    args = ap.parse_args()
    import transformers

    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    if args.gradient_checkpointing:
        variants.append(variants[-1] + "+gc")
    vocab = model_config(args.shape).vocab_size
    gen = torch.Generator(device=args.device).manual_seed(0)
    input_ids = torch.randint(0, vocab, (args.batch, args.seq), device=args.device, generator=gen)
    if args.check:
        print(f"linear_cross_entropy vs F.cross_entropy: max abs diff {check_linear_cross_entropy():.2e}")
    rows = [run_isolated(v, args, input_ids) for v in variants]
    base = next((r["tok_per_s"] for r in rows if r["variant"] == "baseline"), None)
    print(f"{args.shape} train step on {args.device}: {args.batch} x {args.seq} tokens, peak {args.peak_tflops} TFLOP/s")
    print(f"{'variant':<30}{'tok/s':>11}{'step ms':>9}{'MFU':>7}{'MFU(anchor)':>12}{'speedup':>9}{'mem GB':>8}")
    for r in rows:
        r["speedup"] = r["tok_per_s"] / base if base else None
        mem = f"{r['peak_mem_gb']:.1f}" if r["peak_mem_gb"] is not None else "-"
        speed = f"{r['speedup']:.2f}x" if base else "-"
        print(f"{r['variant']:<30}{r['tok_per_s']:>11,.0f}{1000 * r['step_s']:>9.1f}{r['mfu']:>7.1%}"
              f"{r['mfu_anchor']:>12.1%}{speed:>9}{mem:>8}")
    best = max(rows, key=lambda r: r["tok_per_s"])
    cuda = args.device.startswith("cuda")
    result = {
        "benchmark": "train_mfu", "shape": args.shape, "device": args.device,
        "device_name": torch.cuda.get_device_name() if cuda else platform.processor() or "cpu",
        "date": datetime.datetime.now().isoformat(timespec="seconds"), "torch": torch.__version__,
        "transformers": transformers.__version__, "batch": args.batch, "seq": args.seq, "steps": args.steps,
        "peak_tflops": args.peak_tflops,
        "flops_formula": "6*N_matmul + 12*n_layers*n_heads*head_dim*seq per token (PaLM); "
                         "mfu_anchor: 6*N_all with tied embeddings counted twice (design.md anchors)",
        "rows": rows, "best_variant": best["variant"], "best_mfu": best["mfu"], "best_mfu_anchor": best["mfu_anchor"],
        "baseline_mfu": next((r["mfu"] for r in rows if r["variant"] == "baseline"), None),
    }
    if args.shape == "qwen2.5-0.5b":
        result["train_mfu_0p5b"] = best["mfu"]
        result["train_mfu_0p5b_anchor_convention"] = best["mfu_anchor"]
    write_result(result, args.out or Path(__file__).parent / "results" / f"train_mfu_{args.shape}.json")


if __name__ == "__main__":
    main()
