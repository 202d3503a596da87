"""What one generate call of the game needs in memory, checked against the machine before any work.

The estimate reads the policy's ``config.json`` where it is already on this machine (an offline
alias's cache folder, or a local folder) and fetches nothing; a hub id not downloaded gets no check.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from apo_ray.config import Config, ConfigError
from apo_ray.models.loading import offline_folder


def _model_shape(name: str) -> dict[str, int] | None:
    """Vocabulary, layers and K/V width of a model whose config.json is on this machine (an offline
    alias's cache folder or a local folder); None for a hub id not downloaded (nothing is fetched)."""
    folder = offline_folder(name) or Path(name)
    try:
        c = json.loads((folder / "config.json").read_text())
        heads = c["num_attention_heads"]
        head_dim = c.get("head_dim") or c["hidden_size"] // heads
        return {"vocab": int(c["vocab_size"]), "layers": int(c["num_hidden_layers"]),
                "kv_width": int(c.get("num_key_value_heads", heads)) * int(head_dim)}
    except (OSError, ValueError, KeyError, TypeError, ZeroDivisionError):
        return None


def memory_estimate(cfg: Config) -> dict[str, int]:
    """Bytes one generate call of the game needs at least, by what takes them (float32 on a CPU):
    ``logits``: one decode step's logits and the sampler's copy of them, prompts_per_batch x S
    sequences x vocab x 4 B x 2; ``kv_cache``: the K and V of every layer for every token of those
    sequences. Empty when the policy's config is not on this machine."""
    shape = _model_shape(cfg.model.policy)
    g, s = cfg.generation, cfg.apo.samples_per_query
    if shape is None:
        return {}
    sequences = g.prompts_per_batch * s
    tokens = g.max_prompt_tokens + max(g.sampling.max_new_tokens, g.testing.max_new_tokens)
    return {"logits": sequences * shape["vocab"] * 4 * 2,
            "kv_cache": sequences * tokens * shape["layers"] * 2 * shape["kv_width"] * 4}


def _machine_memory_bytes() -> int | None:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def memory_problems(cfg: Config, memory_bytes: int | None = None) -> list[str]:
    """A generate call that cannot fit this machine's memory (CPU generation only: a GPU's memory is
    not known here), refused before any work with the estimate."""
    if cfg.cluster.generator_gpus > 0 and not cfg.run.in_process:
        return []
    memory_bytes = memory_bytes or _machine_memory_bytes()
    est = memory_estimate(cfg)
    if not memory_bytes or not est or sum(est.values()) <= memory_bytes:
        return []
    g = cfg.generation
    parts = ", ".join(f"{k} {v / 2**30:.1f} GiB" for k, v in est.items())
    return [(f"one generate call of generation.prompts_per_batch={g.prompts_per_batch} x "
            f"apo.samples_per_query={cfg.apo.samples_per_query} sequences of up to "
            f"{g.max_prompt_tokens} + {max(g.sampling.max_new_tokens, g.testing.max_new_tokens)} tokens needs at "
            f"least {sum(est.values()) / 2**30:.1f} GiB ({parts}; model {cfg.model.policy}); this machine has "
            f"{memory_bytes / 2**30:.1f} GiB. Lower generation.prompts_per_batch or apo.samples_per_query")]


def check_memory(cfg: Config) -> None:
    """Raise :class:`ConfigError` with the estimate when a generate call cannot fit this machine."""
    problems = memory_problems(cfg)
    if problems:
        raise ConfigError("invalid config:\n  " + "\n  ".join(problems))
