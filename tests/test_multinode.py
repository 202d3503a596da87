"""Two Ray nodes for real: a head and a worker node started with `ray start` on this machine (each its
own temp dir, ports and custom resources; tests/ray_nodes.py), the run's roles placed on them by
``cluster.*_resources``, weights crossing nodes through the object store, and the worker node killed
mid-round.

The layout (the README's cluster section and docker-compose.yml describe the same one):
  head    1 CPU, ``apo_head``    the driver actor and the scorers
  worker  2 CPUs, ``apo_worker`` the generators and the learner workers
so the RM a learner trains (owned by rank 0, in the worker node's object store) reaches the scorers
on the head through Ray's object transfer, and killing the worker node loses both pools' halves and
the learner group at once. Everything runs on this machine's loopback, so these tests check the
placement, the transfers and the recovery, not the network.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import LocalCluster  # tests/ is on sys.path under pytest (as for tests/serving.py)

from apo_ray.data import DEFAULT_DATA

ROOT = Path(__file__).resolve().parents[1]
# Bounded: each subprocess has its own timeout too; a hung test fails instead of holding CI.
pytestmark = [pytest.mark.multinode, pytest.mark.cluster, pytest.mark.slow, pytest.mark.timeout(2400)]

HEAD = {"apo_head": 10.0}
WORKER = {"apo_worker": 10.0}
WORKER_CPUS = 2
LAYOUT = ["+cluster.driver_resources.apo_head=1", "+cluster.scorer_resources.apo_head=1",
          "+cluster.generator_resources.apo_worker=1", "+cluster.learner_resources.apo_worker=1"]


@pytest.fixture(scope="module")
def two_nodes(tiny_model):
    cluster = LocalCluster(head_cpus=1, head_resources=HEAD)
    try:
        cluster.add_worker("worker", cpus=WORKER_CPUS, resources=WORKER)
        yield cluster
    finally:
        cluster.shutdown()


def run_script(text: str, cluster: LocalCluster, tmp_path: Path, *args: str, timeout: int) -> dict:
    """Run ``text`` as its own driver process on the head (Ray reads its auth settings at import);
    return what it printed after ``RESULT ``."""
    script = tmp_path / "script.py"
    script.write_text(text)
    proc = subprocess.run([sys.executable, str(script), cluster.gcs, DEFAULT_DATA, *args], cwd=ROOT,
                          capture_output=True, text=True, timeout=timeout, env=cluster.env, check=False)
    line = next((ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")), None)
    assert line, proc.stdout[-3000:] + proc.stderr[-5000:]
    return json.loads(line[len("RESULT "):])


PLACEMENT_SCRIPT = """
import json, sys
import ray
from ray.experimental import get_object_locations
from apo_ray.config import Config, validate
from apo_ray.data import RankedPair, load_preference_pairs
from apo_ray.game.system import Weights
from apo_ray.runtime.ray_system import RaySystem
from apo_ray.models.training import LearnerJob, RMLoss
from apo_ray.models.weights import unpack_state_dict
from apo_ray.runtime.workers import ScorerWorker

cfg = Config()
cfg.model.policy = cfg.model.reward = "tiny-random-llama"
cfg.model.train_precision = "fp32"
cfg.rm.pairs_per_batch, cfg.rm.micro_pairs, cfg.rm.max_length, cfg.rm.score_batch = 8, 4, 64, 8
c = cfg.cluster
c.generator_cpus = c.scorer_cpus = 0.5
c.generator_resources = c.learner_resources = {"apo_worker": 1.0}
c.scorer_resources = {"apo_head": 1.0}
cfg.run.output_dir = sys.argv[3]  # Ray Train's storage
ray.init(address=sys.argv[1])
validate(cfg, cluster_cpus=ray.cluster_resources()["CPU"], cluster_gpus=0.0,
         node_resources=[n["Resources"] for n in ray.nodes() if n["Alive"]])
role = {n["NodeID"]: ("head" if "apo_head" in n["Resources"] else "worker") for n in ray.nodes() if n["Alive"]}

def node_of(actor):
    return role[ray.get(actor.__ray_call__.remote(lambda self: ray.get_runtime_context().get_node_id()))]

def holders(ref):
    return sorted(role[n] for n in get_object_locations([ref])[ref]["node_ids"])

system = RaySystem(cfg, namespace="multinode-placement")
pairs = list(load_preference_pairs(sys.argv[2], limit=12))
ranked = [RankedPair.from_preference(p) for p in pairs[:8]]
ref, stats = system.train(LearnerJob.rm(cfg, lr=1e-3, epochs=1, seed=0, loss=RMLoss()), Weights("rm/pretrained"), ranked)
before = holders(ref)  # rank 0 put the trained RM in its own node's store
prompts, responses = [p.prompt for p in pairs], [p.chosen for p in pairs]
remote = system.score(Weights("rm/r1", ref), prompts, responses)  # the scorer on the head pulls it
after = holders(ref)
placed = {"generator": node_of(system.generators.actors[0]), "scorer": node_of(system.scorers.actors[0]),
          "driver": role[ray.get_runtime_context().get_node_id()]}
size = get_object_locations([ref])[ref]["object_size"]
local = ScorerWorker(cfg).score(Weights("rm/r1", unpack_state_dict(ray.get(ref), copy=True)), prompts, responses)
pretrained = ScorerWorker(cfg).score(Weights("rm/pretrained"), prompts, responses)
system.shutdown()
print("RESULT " + json.dumps({"before": before, "after": after, "placed": placed, "bytes": size,
                              "remote": remote, "local": local, "pretrained": pretrained}))
"""


def test_roles_are_placed_by_custom_resources_and_weights_cross_nodes(two_nodes, tmp_path):
    """Learners and generators on the worker node, scorers on the head, as cluster.*_resources say;
    the RM trained on the worker reaches the head's scorer through the object store (the head's
    store holds a copy afterwards) and scores as the same weights do in this process."""
    result = run_script(PLACEMENT_SCRIPT, two_nodes, tmp_path, str(tmp_path / "out"), timeout=600)
    assert result["placed"] == {"generator": "worker", "scorer": "head", "driver": "head"}
    assert result["before"] == ["worker"]  # owned and stored where rank 0 runs
    assert result["after"] == ["head", "worker"]  # pulled across by the scorer's node
    assert result["bytes"] > 1e6
    assert result["remote"] == pytest.approx(result["local"], abs=1e-5)
    assert result["remote"] != pytest.approx(result["pretrained"], abs=1e-5)  # the trained RM, not the base


def _apo(cluster: LocalCluster, out: Path, *extra: str) -> list[str]:
    return [sys.executable, "jobs/apo.py", "experiment=smoke", "apo.rounds=1", f"run.output_dir={out}",
            f"data.path={DEFAULT_DATA}", "run.save_models=last", *LAYOUT, *extra]


def _comparable(records: list[dict]) -> list[tuple]:
    return [(r["round"], r["rm_mode"], r["rm"], r["policy"], round(r["rm_test_acc"], 6), round(r["rm_dev_acc"], 6),
             round(r["rm_test_ece"], 6), round(r["policy_mean_reward"], 5)) for r in records]


@pytest.fixture(scope="module")
def layout_run(two_nodes, tmp_path_factory):
    """One uninterrupted smoke round with the two-node layout, through the main entry point."""
    out = tmp_path_factory.mktemp("mn-ref") / "run"
    proc = subprocess.run(_apo(two_nodes, out), cwd=ROOT, capture_output=True, text=True, timeout=900,
                          env=two_nodes.env, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return out


def test_a_smoke_round_runs_across_two_nodes(layout_run):
    records = json.loads((layout_run / "summary.json").read_text())
    assert [r["round"] for r in records] == [0, 1]
    config = json.loads((layout_run / "resolved_config.json").read_text())["cluster"]
    assert config["generator_resources"] == {"apo_worker": 1.0} and config["scorer_resources"] == {"apo_head": 1.0}
    index = json.loads((layout_run / "models" / "index.json").read_text())
    assert sorted(index["versions"]) == ["policy/apo/r1", "rm/apo/r1", "rm/base"] and not index["errors"]


def test_worker_node_killed_mid_round_the_run_finishes_with_the_same_results(two_nodes, layout_run, tmp_path):
    """SIGKILL every process of the worker node (raylet, generator, learner worker and rank 0 that
    owns the round's RM) right after round 1's RM is trained, then start a replacement worker node
    with the same resources, as an autoscaler or Kubernetes would: the generator actor and the
    learner group restart on it, the lost RM is reloaded from its checkpoint, and the run finishes
    with the records of the undisturbed run. Nothing can restart on the head: its nodes do not
    offer ``apo_worker`` (the layout is a hard constraint)."""
    out = tmp_path / "run"
    marker = out / "phases" / "rm__apo__r1.json"  # round 1's RM trained; sampling, scoring, policy to come
    log = (tmp_path / "apo.log").open("w")
    job = subprocess.Popen(_apo(two_nodes, out), cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, text=True,
                           env=two_nodes.env)
    try:
        deadline = time.time() + 600
        while not marker.exists():
            assert job.poll() is None, (tmp_path / "apo.log").read_text()[-5000:]
            assert time.time() < deadline, "round 1's RM was never trained"
            time.sleep(0.05)
        worker = next(n for n in two_nodes.nodes if n.name == "worker")
        killed = worker.kill()
        assert len(killed) >= 4  # ray start, raylet, agents, and the actors placed there
        finished_then = sorted(p.name for p in (out / "phases").glob("*.json"))
        assert "policy__apo__r1.json" not in finished_then  # the kill landed mid-round
        two_nodes.add_worker("worker-2", cpus=WORKER_CPUS, resources=WORKER)
        rc = job.wait(timeout=900)
    finally:
        if job.poll() is None:
            job.kill()
        log.close()
    text = (tmp_path / "apo.log").read_text()
    assert rc == 0, text[-6000:]
    assert _comparable(json.loads((out / "summary.json").read_text())) == _comparable(
        json.loads((layout_run / "summary.json").read_text()))
    assert "object store copy lost (its owner died); loading" in text  # the RM came back from its checkpoint
