"""Which generator a config asks for: the transformers one or the vLLM one, built with its settings.

Apart from both backends so that each can share :mod:`apo_ray.models.generation`'s helpers without
importing the other; vLLM itself is imported only when a :class:`VLLMGenerator` is built.
"""

from __future__ import annotations

from apo_ray.config import Config
from apo_ray.models.generation import HFGenerator
from apo_ray.models.vllm_generator import VLLMGenerator


def make_generator(backend: str, model: str, **kwargs):
    if backend == "transformers":
        return HFGenerator(model, **kwargs)
    if backend == "vllm":
        return VLLMGenerator(model, **kwargs)
    raise ValueError(f"generation.backend must be 'transformers' or 'vllm', got {backend!r}")


def generator_kwargs(cfg: Config) -> dict:
    """The constructor arguments of either backend that ``cfg`` describes (decoding: the sampling
    settings; each call may pass the test settings instead)."""
    g = cfg.generation
    longest = max(g.sampling.max_new_tokens, g.testing.max_new_tokens)
    return {"decoding": g.sampling, "stop": list(g.stop), "max_prompt_tokens": g.max_prompt_tokens,
            "prompts_per_batch": g.prompts_per_batch, "seed": g.seed, "dtype": cfg.model.dtype,
            "fast": g.fast_sampler, "max_model_len": g.max_prompt_tokens + longest,
            "engine_kwargs": dict(g.engine_kwargs)}


def generator_from_config(cfg: Config):
    """The generator ``cfg.generation`` / ``cfg.model.policy`` describe, with the pretrained weights."""
    return make_generator(cfg.generation.backend, cfg.model.policy, **generator_kwargs(cfg))
