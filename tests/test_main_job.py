"""The main entry point end to end in one process (`run.in_process=true`): two arms, one round,
report with the judge (our own Ray Serve server over HTTP with the real openai client), and the
config errors a user gets."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _apo(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/apo.py", *overrides], cwd=ROOT, capture_output=True, text=True,
                          timeout=600, check=False)


@pytest.mark.slow  # the judge starts a Ray Serve app
def test_main_job_in_process_with_report_and_judge(tmp_path, tiny_model, hh_data_path):
    out = tmp_path / "run"
    proc = _apo("experiment=smoke", "run.in_process=true", "apo.rounds=1", "apo.arms=[fixed,apo]",
                "eval.judge=true", "eval.judge_model=tiny-random-llama", "eval.judge_pairs=2",
                "eval.judge_max_tokens=8", f"run.output_dir={out}", f"data.path={hh_data_path}")
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "summary.json").read_text())
    assert sorted((r["round"], r["rm_mode"]) for r in records) == [(0, "apo"), (0, "fixed"), (1, "apo"), (1, "fixed")]
    judge = json.loads((out / "judge_summary.json").read_text())
    # a random model never writes a verdict line: every comparison is counted, as invalid
    assert judge["apo"]["n"] == 2 and judge["apo"]["invalid"] == 2
    report = (out / "report.md").read_text()
    assert "Table 2" in report and "Table 3" in report and "LLM-as-judge" in report
    # paired intervals from the run's phase store, the judge's rates with Wilson intervals beside them
    assert "## Paired differences with 95% bootstrap intervals" in report and "win / (win + loss)" in report
    for png in ("reliability.png", "fig2_acc_vs_ece.png", "fig2_reward_by_round.png", "fig3_judge.png"):
        assert (out / png).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n", png


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_bad_config_names_the_field(tmp_path):
    proc = _apo("experiment=smoke", "run.in_process=true", "apo.beta2=-1", "apo.samples_per_query=0",
                "rm.trainable_layers=0", "model.dtype=bf17", f"run.output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "apo.beta2 must be >= 0, got -1" in proc.stderr
    assert "apo.samples_per_query must be >= 1, got 0" in proc.stderr
    assert "rm.trainable_layers must be >= 1 or null (all layers), got 0" in proc.stderr
    assert "model.dtype must be one of" in proc.stderr and "'bf17'" in proc.stderr
    assert not (tmp_path / "phases").exists()  # refused before any work


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_paper_hh_preset_is_the_papers_setup():
    import yaml

    proc = _apo("experiment=paper_hh", "--cfg", "job")
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load(proc.stdout)
    d = cfg["data"]
    assert d["path"] == ["hf://Anthropic/hh-rlhf?data_dir=helpful-base&split=train",
                         "hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=train"]
    assert d["test_path"] == ["hf://Anthropic/hh-rlhf?data_dir=helpful-base&split=test",
                              "hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=test"]
    assert d["test_pairs"] == 1.0 and d["dev_pairs"] == 10000
    # ~20K / ~66K of the ~86.3K cleaned helpful + harmless train pairs
    assert round(d["rm_pairs"] * 86_300, -3) == 20_000 and round(d["llm_queries"] * 86_300, -3) == 66_000
    assert cfg["eval"]["rm_test"] is True
    g = cfg["generation"]
    assert g["stop"] == ["\nHuman"]
    assert g["sampling"] == {"temperature": 1.2, "top_p": 1.0, "top_k": 0, "repetition_penalty": 1.0,
                                  "max_new_tokens": 256}
    assert g["testing"] == {"temperature": 0.3, "top_p": 0.85, "top_k": 5, "repetition_penalty": 1.05,
                            "max_new_tokens": 512}
    assert (cfg["rm"]["schedule"], cfg["rm"]["warmup_steps"]) == ("linear", 100)
    assert (cfg["policy"]["schedule"], cfg["policy"]["warmup_ratio"]) == ("cosine", 0.03)


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_a_missing_data_path_names_what_was_tried(tmp_path):
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/apo.py"), "experiment=smoke", "run.in_process=true",
                           "data.path=[embedded:hh-rlhf-harmless-test,mine/pairs.jsonl]",
                           f"run.output_dir={tmp_path / 'out'}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0
    assert (f"config error: data.path: 'mine/pairs.jsonl' not found: tried {tmp_path / 'mine/pairs.jsonl'} "
            f"(a relative path is read from the directory the command was started in, {tmp_path})") in proc.stderr
    assert not (tmp_path / "out").exists()
