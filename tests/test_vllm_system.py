"""`generation.backend=vllm` through the whole system, against the real vLLM CPU build.

- The main job in one process (`run.in_process=true`).
- The main job through `ray job submit` to a real `ray start --head`, with the generator actor
  SIGKILLed between its round-1 samples and the round-1 evaluation: Ray restarts it, the restarted
  actor starts a new engine, loads the round-1 policy from the object store and answers with it;
  the killed actor's vLLM processes are reaped.

Both check the round-1 test answers the hard way: the test answers are greedy (with a repetition
penalty, so the random tiny model does not just repeat a newline), and must equal what the
transformers generator answers with the round-1 weights stored in the run's checkpoint, and differ
from the round-0 answers.
"""

from __future__ import annotations

import importlib.util
import json
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed"),
              pytest.mark.slow]

from test_ray_cluster import _ray, _submit, cluster  # noqa: F401  (a `ray start --head` of this module's own)

ROOT = Path(__file__).resolve().parents[1]
VLLM_SMOKE = ["experiment=smoke", "apo.rounds=1", "generation.backend=vllm", "model.dtype=float32",
              "generation.testing.temperature=0", "generation.testing.repetition_penalty=3.0"]


def _resolved(out: Path):
    from omegaconf import OmegaConf

    from apo_ray.config import Config, from_omegaconf

    data = json.loads((out / "resolved_config.json").read_text())
    return from_omegaconf(OmegaConf.merge(OmegaConf.structured(Config), data))


def _check_round1_answers_come_from_the_round1_policy(out: Path) -> None:
    from apo_ray.game.game_data import build_game_data, eval_prompts
    from apo_ray.game.store import PhaseStore, load_checkpoint
    from apo_ray.models.generation import HFGenerator

    cfg = _resolved(out)
    prompts = eval_prompts(cfg, build_game_data(cfg))
    phases = out / "phases"
    r0 = json.loads((phases / "samples__policy__init__test.json").read_text())["value"]  # the store's phase file
    r1 = json.loads((phases / "samples__policy__apo__r1__test.json").read_text())["value"]
    g = cfg.generation
    # one prompt per batch: no left padding, the prompt tokens vLLM saw (and penalised)
    hf = HFGenerator(cfg.model.policy, decoding=g.testing, max_prompt_tokens=g.max_prompt_tokens,
                     prompts_per_batch=1, dtype="float32", device="cpu")
    assert hf.generate(prompts, 1) == r0
    hf.load_weights(load_checkpoint(PhaseStore(phases, system=None).version_path("policy/apo/r1")))
    assert hf.generate(prompts, 1) == r1
    assert sum(a != b for a, b in zip(r0, r1)) >= len(prompts) // 2, (r0, r1)


def test_main_job_in_process_with_vllm(tmp_path, tiny_model, hh_data_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "jobs/apo.py", *VLLM_SMOKE, "run.in_process=true",
                           f"data.path={hh_data_path}", f"run.output_dir={out}"],
                          cwd=ROOT, capture_output=True, text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    records = json.loads((out / "summary.json").read_text())
    assert [(r["round"], r["rm_mode"]) for r in records] == [(0, "apo"), (1, "apo")]
    _check_round1_answers_come_from_the_round1_policy(out)


KILL_SCRIPT = """
import json, os, pathlib, signal, sys, time
import psutil
from ray.util.state import list_actors

address, marker, namespace = sys.argv[1], pathlib.Path(sys.argv[2]), sys.argv[3]
deadline = time.time() + 600
while not marker.exists():
    if time.time() > deadline:
        sys.exit(f"{marker} never appeared")
    time.sleep(0.1)
filters = [("name", "=", "apo-generator-0"), ("ray_namespace", "=", namespace), ("state", "=", "ALIVE")]
(actor,) = list_actors(address=address, filters=filters)
victim = psutil.Process(actor.pid)
engine = [p.pid for p in victim.children(recursive=True) if p.name().startswith("VLLM")]
os.kill(actor.pid, signal.SIGKILL)
print("KILLED " + json.dumps({"pid": actor.pid, "engine": engine, "at": time.time()}), flush=True)
while time.time() < deadline:  # Ray restarts it (cluster.max_actor_restarts)
    alive = list_actors(address=address, filters=filters, detail=True)
    if alive and alive[0].pid != actor.pid:
        print("RESTARTED " + json.dumps({"pid": alive[0].pid, "num_restarts": alive[0].num_restarts}), flush=True)
        break
    time.sleep(0.5)
"""


@pytest.mark.cluster
def test_job_submit_with_vllm_survives_a_killed_generator(cluster, tmp_path, tiny_model, hh_data_path):  # noqa: F811
    out = tmp_path / "run"
    namespace = "apo-vllm-kill"
    # _submit adds experiment=smoke apo.rounds=1 and the data / output paths
    proc = _submit(cluster, out, *VLLM_SMOKE[2:], f"cluster.namespace={namespace}", wait=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    job_id = re.search(r"raysubmit_[A-Za-z0-9]+", proc.stdout + proc.stderr).group(0)
    script = tmp_path / "kill.py"
    script.write_text(KILL_SCRIPT)
    # After the round-1 samples the policy learner runs; the generator's next call is the round-1
    # evaluation, with weights it must get from the object store.
    marker = out / "phases" / "samples__policy__init__queries.json"
    killer = subprocess.run([sys.executable, str(script), cluster["dashboard"], str(marker), namespace],
                            cwd=ROOT, capture_output=True, text=True, timeout=700, env=cluster["env"], check=False)
    assert "KILLED" in killer.stdout, killer.stdout[-2000:] + killer.stderr[-2000:]
    killed = json.loads(killer.stdout.split("KILLED ", 1)[1].splitlines()[0])
    assert "RESTARTED" in killer.stdout, killer.stdout[-2000:] + killer.stderr[-2000:]
    restarted = json.loads(killer.stdout.split("RESTARTED ", 1)[1].splitlines()[0])
    assert restarted["num_restarts"] >= 1
    deadline = time.time() + 600
    while time.time() < deadline:
        status = _ray("job", "status", job_id, "--address", cluster["dashboard"], env=cluster["env"])
        said = (status.stdout + status.stderr).lower()  # "Job '...' succeeded"
        if any(f"' {s}" in said for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(3)
    logs = _ray("job", "logs", job_id, "--address", cluster["dashboard"], env=cluster["env"], check=False).stdout
    assert "' succeeded" in said, status.stdout + status.stderr + logs[-4000:]

    import psutil

    assert killed["engine"], "the killed actor ran no vLLM engine processes"
    _, alive = psutil.wait_procs([p for p in map(_process, killed["engine"]) if p], timeout=30)
    assert not alive, f"the killed actor's vLLM processes were not reaped: {alive}"
    records = json.loads((out / "summary.json").read_text())
    assert [(r["round"], r["rm_mode"]) for r in records] == [(0, "apo"), (1, "apo")]
    # the round-1 test answers were written after the kill, so by the restarted actor
    assert (out / "phases" / "samples__policy__apo__r1__test.json").stat().st_mtime > killed["at"]
    _check_round1_answers_come_from_the_round1_policy(out)


def _process(pid: int):
    import psutil

    try:
        return psutil.Process(pid)
    except psutil.NoSuchProcess:
        return None
