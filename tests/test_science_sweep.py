"""benchmarks/science.py's bookkeeping around the seeds it runs: which run first, and when a seed's
weight files may go (only after its job, model export included, has ended)."""

import importlib.util
import json
import os
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def load_science():
    spec = importlib.util.spec_from_file_location("science_bench", ROOT / "benchmarks" / "science.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def finished_seed(run_dir: Path) -> Path:
    """A seed folder as a finished run leaves it: run_timing.json, a score record and a checkpoint."""
    (run_dir / "phases").mkdir(parents=True)
    (run_dir / "phases" / "rm__base.json").write_text("{}")
    weights = run_dir / "phases" / "rm__base.safetensors"
    weights.write_bytes(b"weights")
    (run_dir / "run_timing.json").write_text(json.dumps({"wall_seconds": 1.0}))
    return weights


def test_weights_stay_until_the_seeds_job_has_ended(tmp_path):
    """run_timing.json is written before the job exports its models (which reads the weights):
    the weights go once the next seed's job has written into its folder, or the sweep has ended,
    never before; a later seed's folder left over from before does not count."""
    science = load_science()
    seed0, seed1, seed2 = tmp_path / "seed0", tmp_path / "seed1", tmp_path / "seed2"
    (seed2 / "phases").mkdir(parents=True)  # an empty folder from an earlier sweep
    os.utime(seed2, (1e9, 1e9))
    sampler = science.LoadSampler(prune=[seed0, seed1, seed2])
    weights0 = finished_seed(seed0)
    sampler.prune_finished()
    assert weights0.exists()  # seed 0 may still be exporting

    (seed1 / "phases").mkdir(parents=True)  # the multirun started seed 1: seed 0's job returned
    sampler.prune_finished()
    assert not weights0.exists() and (seed0 / "phases" / "rm__base.json").exists()

    weights1 = seed1 / "phases" / "rm__base.safetensors"
    weights1.write_bytes(b"weights")
    sampler.prune_finished(sweep_ended=True)
    assert weights1.exists()  # seed 1 never finished: a resume needs its weights
    (seed1 / "run_timing.json").write_text("{}")
    sampler.prune_finished()
    assert weights1.exists()  # seed 2's folder predates seed 1's end: seed 1 may still be exporting
    sampler.prune_finished(sweep_ended=True)
    assert not weights1.exists()


def test_stopped_seeds_run_first_then_fresh_ones(tmp_path):
    science = load_science()
    (tmp_path / "seed2" / "phases").mkdir(parents=True)  # stopped after its first phase: resumes
    (tmp_path / "seed2" / "phases" / "rm__base.json").write_text("{}")
    (tmp_path / "seed1" / "phases").mkdir(parents=True)  # created, nothing finished: runs fresh
    assert science.run_order([0, 1, 2, 3], tmp_path) == ([2], [0, 1, 3])


def test_bad_seeds_and_presets_are_refused_before_anything_runs(capsys):
    import argparse

    import pytest

    science = load_science()
    assert science.seed_list("100,101,7") == [100, 101, 7]
    for text in ("a,b", "1,,2", "-1", "1,1"):
        with pytest.raises(argparse.ArgumentTypeError):
            science.seed_list(text)
    assert science.preset_name("rm_claims_r1") == "rm_claims_r1"
    with pytest.raises(argparse.ArgumentTypeError, match="no preset 'nope'.*rm_claims_harmless"):
        science.preset_name("nope")


def test_a_damaged_seed_file_is_one_line_naming_it(tmp_path):
    import pytest

    science = load_science()
    summary = tmp_path / "summary.json"
    summary.write_text('[{"round": 0, "rm_mode": ')  # cut short
    with pytest.raises(SystemExit, match=r"summary.json: not valid JSON \(line 1, column 26"):
        science.phase_seconds(tmp_path)


def test_counts_below_one_are_usage_errors_in_every_science_and_cost_script():
    """--resamples 0 used to end a whole report run in a ValueError traceback, --repeats 0 in an
    IndexError after minutes of work: each count is an argparse error before anything runs."""
    import subprocess
    import sys

    for script, args in (("science.py", ["--resamples", "0"]), ("rjs_pilot.py", ["--run-dir", "x", "--resamples", "-3"]),
                         ("rm_claims_cost.py", ["--repeats", "0"]), ("phase_store.py", ["--repeats", "two"])):
        done = subprocess.run([sys.executable, str(ROOT / "benchmarks" / script), *args], capture_output=True,
                              text=True, timeout=120, cwd=ROOT.parent)
        assert done.returncode == 2, (script, done.stderr[-500:])
        assert "must be 1 or more" in done.stderr or "is not an integer" in done.stderr, done.stderr[-500:]
        assert "Traceback" not in done.stderr
