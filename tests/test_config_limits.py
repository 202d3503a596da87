"""The config schema is closed and every number has the range the code can use: unknown keys (even
added with Hydra's `+`) are refused naming the nearest key; loss weights that would make every RM
step a no-op, round counts that hang the planner and generate calls the machine cannot hold are
refused before any work, with the estimate."""

from __future__ import annotations

import dataclasses
import os
import subprocess
import sys
import time
import typing
from pathlib import Path

import pytest

from apo_ray import config as config_module
from apo_ray.config import Config, ConfigError, compose, validate
from apo_ray.models.memory import memory_estimate, memory_problems
from apo_ray.outputs.report import no_op_phases

ROOT = Path(__file__).resolve().parents[1]


def _refused(cfg: Config) -> str:
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


def test_unknown_keys_are_refused_with_the_nearest_valid_one():
    with pytest.raises(ConfigError) as err:
        compose(["experiment=smoke", "+apo.beta_2=0.5", "+foo.bar=1", "+rm.lrr=1"])
    message = str(err.value)
    assert "apo.beta_2 is not a setting of apo_ray (did you mean apo.beta2?)" in message
    assert "foo is not a setting of apo_ray" in message
    assert "rm.lrr is not a setting of apo_ray (did you mean rm.lr?)" in message
    # a free-form dict (extra vLLM engine arguments) takes any key
    assert compose(["experiment=smoke", "+generation.engine_kwargs.seed=1"]).generation.engine_kwargs == {"seed": 1}


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_refuses_an_unknown_key_before_touching_the_folder(tmp_path):
    out = tmp_path / "out"
    proc = subprocess.run([sys.executable, "jobs/apo.py", "experiment=smoke", "run.in_process=true",
                           "+apo.beta_2=0.5", f"run.output_dir={out}"], cwd=ROOT, capture_output=True, text=True,
                          timeout=300, check=False, env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "did you mean apo.beta2?" in proc.stderr
    assert not out.exists()


def test_loss_weights_that_make_the_rm_a_no_op_are_refused():
    cfg = Config()
    cfg.apo.beta2 = 1e30
    assert "apo.beta2 must be >= 0 and <= 1e+06 (larger weights overflow the gradients" in _refused(cfg)
    cfg = Config()
    cfg.apo.beta2, cfg.apo.apo_weight = 0.0, 0.0
    assert "the RM loss would be 0" in _refused(cfg)


def test_skipped_steps_are_loud_in_the_report():
    records = [{"round": 1, "rm_mode": "apo", "rm_train": {"steps": 3, "skipped_steps": 3},
                "policy_train": {"steps": 4, "skipped_steps": 1}},
               {"round": 2, "rm_mode": "apo", "rm_train": {"steps": 3, "skipped_steps": 0}}]
    notes = no_op_phases(records)
    assert len(notes) == 2
    assert "apo round 1, RM training: **every** optimiser step was skipped" in notes[0]
    assert "1 of 4 optimiser steps were skipped" in notes[1]


def test_sizes_that_hang_or_cannot_fit_are_refused_at_once(tiny_model):
    cfg = compose(["experiment=smoke", "apo.rounds=1000000000"])
    start = time.monotonic()
    assert "apo.rounds must be >= 1 and <= 1000" in _refused(cfg)
    assert time.monotonic() - start < 5
    cfg = compose(["experiment=smoke", "apo.samples_per_query=100000"])
    assert "apo.samples_per_query must be >= 1 and <= 1024, got 100000" in _refused(cfg)
    # within the limits but not within this machine: the estimate is named (tiny model: vocab 49152,
    # 2 layers, K/V width 32; 64 x 1024 sequences of 64 + 8 tokens)
    cfg = compose(["experiment=smoke", "apo.samples_per_query=1024", "generation.prompts_per_batch=64"])
    est = memory_estimate(cfg)
    assert est["logits"] == 64 * 1024 * 49152 * 4 * 2  # 24 GiB
    assert est["kv_cache"] == 64 * 1024 * (64 + 8) * 2 * 2 * 32 * 4  # 2.25 GiB
    (problem,) = memory_problems(cfg, memory_bytes=8 << 30)
    assert "generation.prompts_per_batch=64 x apo.samples_per_query=1024" in problem
    assert "needs at least 26.2 GiB (logits 24.0 GiB, kv_cache 2.2 GiB" in problem and "this machine has 8.0 GiB" in problem
    assert memory_problems(compose(["experiment=smoke"]), memory_bytes=8 << 30) == []


def _int_fields(cls=Config, prefix=""):
    """Every integer setting of the schema, as (dotted name, section object path)."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
        if dataclasses.is_dataclass(default):
            yield from _int_fields(type(default), f"{prefix}{f.name}.")
        elif int in typing.get_args(hints[f.name]) or hints[f.name] is int:
            yield prefix + f.name


INT_FIELDS = sorted(_int_fields())


def _set(cfg: Config, dotted: str, value) -> None:
    *path, name = dotted.split(".")
    obj = cfg
    for part in path:
        obj = getattr(obj, part)
    setattr(obj, name, value)


@pytest.mark.parametrize("name", INT_FIELDS)
@pytest.mark.parametrize("value", [2**63, -(2**63)])
def test_every_integer_setting_is_checked_against_its_range(name, value):
    cfg = Config()
    _set(cfg, name, value)
    assert f"{name} must be" in _refused(cfg)


def test_the_integer_settings_are_the_ones_expected():
    assert len(INT_FIELDS) >= 35 and "apo.rounds" in INT_FIELDS and "generation.sampling.top_k" in INT_FIELDS
    assert config_module.MAX_SEED == 2**32 - 1
