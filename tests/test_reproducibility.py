"""Same stack + same seed = the same numbers, whatever was in the model cache before.

A cold cache builds models (SmolLM2's GGUF conversion, the tiny model's random init, which also
reseeds torch); none of that may reach a seeded draw: RM_Base's scalar head, the shuffles, the
samples. Checked on a learner job (RM_Base and the first policy phase) with the tiny model, then
(``slow``) on whole runs from an empty cache, in one process and on a Ray instance of their own.
Also: every run names its software stack, and a resume on another stack is refused or warned about.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from apo_ray.data import RankedPair
from apo_ray.game.stack import software_stack, stack_changes
from apo_ray.game.store import ResumeError, check_store, open_store
from apo_ray.models.loading import isolated_rng, offline_folder
from apo_ray.models.training import LearnerJob, RMLoss, run_job

ROOT = Path(__file__).resolve().parents[1]
TINY = "tiny-random-llama"


def _draws() -> tuple:
    return torch.rand(4).tolist(), random.random(), float(np.random.rand())


def test_isolated_rng_leaves_the_callers_streams_as_they_were():
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    expected = _draws()
    torch.manual_seed(7), random.seed(7), np.random.seed(7)
    with isolated_rng():
        torch.manual_seed(0), random.seed(0), np.random.seed(0)  # what a model builder does
        torch.nn.Linear(64, 64)
        _draws()
    assert _draws() == expected


def _cold_cache(tmp_path: Path, monkeypatch, smollm2_model: str) -> Path:
    """An empty model cache but for SmolLM2 (linked: its conversion is the slow test's), so the
    tiny model is built on first use, as on a fresh machine."""
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / Path(smollm2_model).name).symlink_to(smollm2_model)
    monkeypatch.setenv("APO_RAY_CACHE", str(cache))
    assert not (offline_folder(TINY) / "config.json").exists()
    return cache


def _learner_jobs(cfg, hh_pairs) -> dict[str, tuple]:
    """RM_Base's job (seed 0, as the game's) and a first policy phase (seed 1), on the tiny model."""
    pairs = [RankedPair.from_preference(p) for p in hh_pairs[:8]]
    examples = [(p.prompt, p.chosen) for p in hh_pairs[:6]]
    rm = LearnerJob.rm(cfg, lr=1e-3, epochs=1, seed=cfg.run.seed, loss=RMLoss())
    policy = LearnerJob.policy(cfg, lr=1e-3, seed=cfg.run.seed + 1)
    return {"rm_base": (rm, pairs), "policy_r1": (policy, examples)}


def test_a_cold_cache_trains_the_same_rm_base_and_policy_as_a_warm_one(tiny_cfg, hh_pairs, smollm2_model,
                                                                        tmp_path, monkeypatch):
    jobs = _learner_jobs(tiny_cfg, hh_pairs)
    warm = {}
    for name, (job, data) in jobs.items():
        torch.manual_seed(12345)  # whatever the process drew before: the job seeds itself
        torch.rand(3)
        warm[name] = run_job(job, None, data)
    _cold_cache(tmp_path, monkeypatch, smollm2_model)
    cold = {}
    for name, (job, data) in jobs.items():
        cold[name] = run_job(job, None, data)  # the first one builds the tiny model (and reseeds while building)
    assert (offline_folder(TINY) / "config.json").exists()
    for name in jobs:
        (w_state, w_stats), (c_state, c_stats) = warm[name], cold[name]
        assert c_stats["losses"] == w_stats["losses"], name
        assert w_state.keys() == c_state.keys()
        unequal = [k for k in w_state if not torch.equal(w_state[k], c_state[k])]
        assert not unequal, f"{name}: {unequal[:3]} differ between a cold and a warm model cache"


# ------------------------------------------------------------------------------ the stack


def test_stack_names_versions_hardware_dtypes_and_weight_digests(tiny_cfg, tiny_model):
    from apo_ray.game.stack import package_version

    stack = software_stack(tiny_cfg)
    assert stack["packages"]["torch"] == torch.__version__
    assert stack["packages"]["transformers"] == package_version("transformers") != "not installed"
    assert package_version("no-such-package-apo") == "not installed"
    assert stack["cpu"]["torch_capability"] == torch.backends.cpu.get_cpu_capability()
    assert stack["dtype"] == {"generation": "float32", "train_precision": "fp32"}  # the tiny config's
    files = stack["models"]["model.policy"]["files"]
    assert list(files) == ["model.safetensors"]
    import hashlib

    assert files["model.safetensors"] == hashlib.sha256((Path(tiny_model) / "model.safetensors").read_bytes()).hexdigest()
    assert json.loads(json.dumps(stack)) == stack  # JSON as it is


def test_stack_changes_split_into_refused_and_warned():
    old = {"python": "3.11.7", "packages": {"torch": "2.13.0", "transformers": "5.19.0", "ray": "2.60.0",
                                            "deepspeed": "0.19.8"},
           "cpu": {"model": "A", "torch_capability": "AVX2", "flags": ["avx2"]}, "dtype": {"generation": "float32"}}
    new = json.loads(json.dumps(old))
    new["packages"] |= {"transformers": "5.25.0", "ray": "2.61.0", "deepspeed": "0.20.0"}
    new["cpu"]["model"] = "B"
    refuse, warn = stack_changes(old, new)
    assert refuse == ["packages.transformers: 5.19.0 -> 5.25.0"]
    assert warn == ["cpu.model: A -> B", "packages.deepspeed: 0.19.8 -> 0.20.0", "packages.ray: 2.60.0 -> 2.61.0"]
    refuse, _ = stack_changes(old, new, trains_with_deepspeed=True)
    assert "packages.deepspeed: 0.19.8 -> 0.20.0" in refuse
    new = json.loads(json.dumps(old))
    new["cpu"] |= {"torch_capability": "AVX512", "flags": ["avx2", "avx512f"]}
    new["dtype"]["generation"] = "bfloat16"
    assert len(stack_changes(old, new)[0]) == 3


def _store_of_another_stack(cfg, tmp_path: Path, edit) -> Path:
    cfg.run.output_dir = str(tmp_path)
    open_store(cfg, system=None)
    marker = tmp_path / "phases" / "fingerprint.json"
    fingerprint = json.loads(marker.read_text())
    edit(fingerprint)
    marker.write_text(json.dumps(fingerprint))
    cfg.run.resume = True
    return marker


def test_resume_on_another_torch_is_refused_naming_the_change(tiny_cfg, tmp_path):
    def older_torch(fp):
        fp["stack"]["packages"]["torch"] = "2.12.0"

    _store_of_another_stack(tiny_cfg, tmp_path, older_torch)
    with pytest.raises(ResumeError, match=r"packages\.torch: 2\.12\.0 -> " + re.escape(torch.__version__)):
        check_store(tiny_cfg)


def test_resume_on_another_ray_is_warned_about(tiny_cfg, tmp_path, caplog):
    def older_ray(fp):
        fp["stack"]["packages"]["ray"] = "2.59.0"

    _store_of_another_stack(tiny_cfg, tmp_path, older_ray)
    with caplog.at_level(logging.WARNING, logger="apo_ray.game.store"):
        check_store(tiny_cfg)
    assert "packages.ray: 2.59.0 ->" in caplog.text


def test_resume_of_a_run_from_before_stacks_is_warned_about(tiny_cfg, tmp_path, caplog):
    _store_of_another_stack(tiny_cfg, tmp_path, lambda fp: fp.pop("stack"))
    with caplog.at_level(logging.WARNING, logger="apo_ray.game.store"):
        check_store(tiny_cfg)
    assert "before apo_ray recorded software stacks" in caplog.text


# ------------------------------------------------------------------------------ local Ray instances


def test_a_local_instance_gets_the_logical_cpus_the_run_needs(tiny_cfg, monkeypatch):
    from apo_ray.config import total_demand
    from apo_ray.runtime.launch import local_instance_cpus

    cfg = tiny_cfg
    cfg.cluster.generator_cpus = cfg.cluster.scorer_cpus = cfg.cluster.learner_cpus = 2.0  # the demo's
    cfg.cluster.local_num_cpus = None
    monkeypatch.setattr(os, "cpu_count", lambda: 2)
    assert total_demand(cfg)["CPU"] == 6.0 and local_instance_cpus(cfg) == 6
    monkeypatch.setattr(os, "cpu_count", lambda: 32)
    assert local_instance_cpus(cfg) == 32  # never fewer than the machine's cores
    cfg.cluster.local_num_cpus = 3  # the user's word, validated against the run like any cluster
    assert local_instance_cpus(cfg) == 3


# ------------------------------------------------------------------------------ whole runs (slow)

# Time and machine load, not results; and where the versions live (Ray's object store; nothing to
# report in one process).
NOT_RESULTS = ("seconds", "per_s", "sync_bytes", "resources_after_round")


def _results(summary: Path) -> list[dict]:
    """summary.json without its timings (any key naming seconds or a rate) and resource readings."""
    def strip(value):
        if isinstance(value, dict):
            return {k: strip(v) for k, v in value.items() if not any(t in k for t in NOT_RESULTS)}
        if isinstance(value, list):
            return [strip(v) for v in value]
        return value

    return strip(json.loads(summary.read_text()))


def _run(out: Path, *overrides: str, cache: Path | None = None) -> Path:
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    if cache is not None:
        env["APO_RAY_CACHE"] = str(cache)
    proc = subprocess.run([sys.executable, "jobs/apo.py", "experiment=smoke", "apo.rounds=1", "apo.arms=[fixed,apo]",
                           f"run.output_dir={out}", *overrides], cwd=ROOT, env=env, capture_output=True, text=True,
                          timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    return out / "summary.json"


@pytest.fixture(scope="module")
def warm_summary(tmp_path_factory, tiny_model) -> Path:
    return _run(tmp_path_factory.mktemp("warm") / "run", "run.in_process=true")


@pytest.mark.slow
def test_a_run_from_an_empty_cache_gives_the_warm_runs_summary(warm_summary, tmp_path):
    cache = tmp_path / "empty-cache"  # SmolLM2 converted from the GGUF, then the tiny model built
    cold = _run(tmp_path / "run", "run.in_process=true", cache=cache)
    assert (cache / "smollm2-135m-instruct" / "config.json").exists()
    assert _results(cold) == _results(warm_summary)
    stack = json.loads(cold.read_text())[0]["stack"]
    assert stack["packages"]["torch"] == torch.__version__ and stack["models"]["model.reward"]["files"]
    assert "- Stack: Python " in (cold.parent / "report.md").read_text()


@pytest.mark.slow
def test_a_ray_run_from_an_empty_cache_gives_the_warm_runs_summary(warm_summary, tmp_path):
    """On a Ray instance of its own: the pools build the model at start-up while the learner starts."""
    cold = _run(tmp_path / "run", "cluster.address=local", cache=tmp_path / "empty-cache")
    assert _results(cold) == _results(warm_summary)
