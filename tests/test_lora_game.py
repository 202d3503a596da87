"""LoRA end to end: the game in one process with LoRA learners (every stored version an adapter,
resume after a crash mid-round gives the same records and adapters), and through `ray job submit`
on a real cluster with the vLLM generator serving the policy adapters, stopped and resumed.
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from test_game import GREEDY_TESTS, Crash, RecordingSystem, max_abs_diff, play
from test_ray_cluster import _submit, cluster  # noqa: F401  (a `ray start --head` of this module's own)
from test_vllm_system import VLLM_SMOKE, _resolved

from apo_ray.config import LoraConfig
from apo_ray.game.store import PhaseStore, load_checkpoint
from apo_ray.models import lora
from apo_ray.runtime.in_process import InProcessSystem

LORA = {"rm__lora": LoraConfig(rank=4, alpha=8.0), "policy__lora": LoraConfig(rank=4, alpha=8.0)}


@pytest.mark.slow
def test_lora_game_stores_adapters_and_resumes_after_a_crash(tiny_cfg_factory, tmp_path):
    cfg = tiny_cfg_factory(apo__arms=["apo_seq"], apo__rounds=2, **GREEDY_TESTS, **LORA)
    whole = play(cfg, tmp_path / "whole")
    for key in ("rm/base", "rm/apo/r1", "rm/apo_seq/r2", "policy/apo/r1", "policy/apo_seq/r2"):
        state = whole.weights(key)
        assert lora.is_adapter(state), key  # only the adapter (and the RM head) is stored
        assert lora.read_spec(state).base_model == cfg.model.policy
        assert whole.store.get(key)["lora"]["rank"] == 4  # the marker names the base model and the shape
    assert "base_model.model.score.weight" in whole.weights("rm/base")
    for rec in whole.records:
        assert all(math.isfinite(rec[k]) for k in ("rm_test_acc", "policy_mean_reward"))
    # The policy lineage moved between rounds.
    assert whole.weights("policy/apo_seq/r2").keys() == whole.weights("policy/apo/r1").keys()
    assert max_abs_diff(lora.tensors_of(whole.weights("policy/apo_seq/r2")),
                        lora.tensors_of(whole.weights("policy/apo/r1"))) > 0

    root = tmp_path / "crashed"
    crashing = RecordingSystem(InProcessSystem(cfg), crash_policy_from="policy/apo/r1")  # round 2's policy update
    with pytest.raises(Crash):
        play(cfg, root, crashing)
    resumed = play(cfg, root)
    assert resumed.system.of("train_rm") == []  # every RM phase was finished before the crash
    assert [c[0] for c in resumed.system.of("train_policy")] == ["policy/apo/r1"]
    for rec, ref in zip(resumed.records, whole.records, strict=True):
        for k in ("rm_test_acc", "rm_dev_acc", "policy_mean_reward"):
            assert rec[k] == pytest.approx(ref[k], abs=1e-6), (rec["round"], k)
    a, b = resumed.weights("policy/apo_seq/r2"), whole.weights("policy/apo_seq/r2")
    assert max_abs_diff(lora.tensors_of(a), lora.tensors_of(b)) < 1e-6
    assert torch.equal(a[lora.META_KEY], b[lora.META_KEY])


@pytest.mark.slow
@pytest.mark.cluster
def test_lora_job_through_ray_job_submit_serves_adapters_on_vllm(cluster, tmp_path, tiny_model):  # noqa: F811
    """`ray job submit` of a LoRA smoke round on the vLLM backend (a `ray start --head` of our own):
    the round-1 test answers are what transformers + the stored adapter answer, the stored and
    exported versions are adapters, and a resubmission with run.resume=true recomputes nothing."""
    pytest.importorskip("vllm")
    out = tmp_path / "run"
    extra = [a for a in VLLM_SMOKE if a not in ("experiment=smoke", "apo.rounds=1")]
    lora_args = ["rm.lora.rank=8", "policy.lora.rank=8", "run.export_merged=true"]
    proc = _submit(cluster, out, *extra, *lora_args, timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    records = json.loads((out / "summary.json").read_text())
    assert [(r["round"], r["rm_mode"]) for r in records] == [(0, "apo"), (1, "apo")]
    policy = load_checkpoint(PhaseStore(out / "phases", None).version_path("policy/apo/r1"))
    assert lora.is_adapter(policy) and lora.read_spec(policy).rank == 8
    _check_answers_of_the_adapter(out, policy)
    exported = out / "models" / "policy" / "apo" / "r1"
    assert (exported / "adapter_model.safetensors").exists() and (exported / "merged" / "config.json").exists()

    done = {p.name: p.stat().st_mtime_ns for p in (out / "phases").glob("*.json") if p.name != "fingerprint.json"}
    proc = _submit(cluster, out, *extra, *lora_args, "run.resume=true", timeout=900)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]
    for name, mtime in done.items():
        assert (out / "phases" / name).stat().st_mtime_ns == mtime, name


def _check_answers_of_the_adapter(out, adapter) -> None:
    """The round-1 test answers vLLM gave with the served adapter are those of transformers with the
    stored adapter applied, and differ from the base policy's (round 0)."""
    from apo_ray.game.game_data import build_game_data, eval_prompts
    from apo_ray.models.generation import HFGenerator

    cfg = _resolved(out)
    prompts = eval_prompts(cfg, build_game_data(cfg))
    phases = out / "phases"
    r0 = json.loads((phases / "samples__policy__init__test.json").read_text())["value"]
    r1 = json.loads((phases / "samples__policy__apo__r1__test.json").read_text())["value"]
    g = cfg.generation
    hf = HFGenerator(cfg.model.policy, decoding=g.testing, max_prompt_tokens=g.max_prompt_tokens,
                     prompts_per_batch=1, dtype="float32", device="cpu")
    assert hf.generate(prompts, 1) == r0
    hf.load_weights(adapter)
    assert hf.generate(prompts, 1) == r1
    assert r0 != r1
