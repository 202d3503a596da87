"""Config validation: every value that cannot work is refused before any work, with a message that
names the field and the value; layouts the Ray cluster could never place are refused against its
resources (the pools, the learner workers and the driver are alive at once)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apo_ray.config import Config, ConfigError, resource_problems, total_demand, validate

ROOT = Path(__file__).resolve().parents[1]
RM_PAIRS_RULE = "data.rm_pairs must be an int count or a float fraction in (0, 1] (not 0: the game needs it)"


def problems(**overrides) -> str:
    cfg = Config()
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    with pytest.raises(ConfigError) as err:
        validate(cfg)
    return str(err.value)


@pytest.mark.parametrize(("field", "value", "message"), [
    ("eval__judge_concurrency", 0, "eval.judge_concurrency must be >= 1, got 0"),
    ("generation__max_prompt_tokens", 0, "generation.max_prompt_tokens must be >= 1, got 0"),
    ("data__gold_queries", -2, "data.gold_queries must be >= 1 or null (every D_P prompt), got -2"),
    ("eval__test_queries", -1, "eval.test_queries must be >= 1 or null (every test prompt), got -1"),
    ("cluster__max_actor_restarts", -1, "cluster.max_actor_restarts must be >= 0, got -1"),
    ("rm__score_batch", 0, "rm.score_batch must be >= 1, got 0"),
    ("rm__epochs", 0, "rm.epochs must be >= 1, got 0"),
    ("cluster__learner_placement", "pack",
     "cluster.learner_placement must be one of ('PACK', 'SPREAD', 'STRICT_PACK', 'STRICT_SPREAD'), got 'pack'"),
    ("rm__lr", float("inf"), "rm.lr must be a finite number > 0, got inf"),
    ("rm__base_lr", float("nan"), "rm.base_lr must be a finite number > 0, got nan"),
    ("data__rm_pairs", 1.5, f"{RM_PAIRS_RULE}, got 1.5"),
    ("data__rm_pairs", "abc", f"{RM_PAIRS_RULE}, got 'abc'"),
    ("data__dev_pairs", True, "data.dev_pairs must be an int count or a float fraction in (0, 1], got True"),
    ("policy__lrs", [1e-6, float("inf")], "policy.lrs[1] must be a finite number > 0, got inf"),
    ("cluster__scorer_gpus", -1.0, "cluster.scorer_gpus must be >= 0, got -1.0"),
    ("cluster__resource_wait_s", 0.0, "cluster.resource_wait_s must be > 0, got 0.0"),
    ("eval__judge_max_failed_fraction", 1.5, "eval.judge_max_failed_fraction must be >= 0 and <= 1, got 1.5"),
    ("cluster__generator_resources", {"apo_pool": 0}, "cluster.generator_resources.apo_pool must be > 0, got 0"),
    ("cluster__learner_resources", {"GPU": 1},
     "cluster.learner_resources.GPU: GPU is a built-in Ray resource, not a custom one (use cluster.learner_gpus)"),
    ("cluster__driver_resources", ["head"], "cluster.driver_resources must map custom Ray resource names to amounts"),
    ("apo__arm_rounds", {"ablation": 1}, "apo.arm_rounds: 'ablation' is not one of this run's arms ['apo']"),
    ("apo__arm_rounds", {"apo": 4}, "apo.arm_rounds.apo must be an int in [1, apo.rounds=3], got 4"),
    ("rm__max_response_tokens", 0, "rm.max_response_tokens must be >= 1 or null (derived from rm.max_length), got 0"),
    ("policy__objective", "ppo", "policy.objective must be one of ['dpo', 'rjs'], got 'ppo'"),
    ("policy__updater", "dpo", "policy.updater was renamed policy.objective: use policy.objective=dpo"),
])
def test_each_bad_value_is_named(field, value, message):
    assert message in problems(**{field: value})


def test_data_sizes_that_cannot_fit_are_config_errors():
    # issue 15's side finding: dev pairs come from the LLM block, so 8 of 4 cannot work
    assert "data.dev_pairs=8 exceeds data.llm_queries=4" in problems(data__llm_queries=4, data__dev_pairs=8)
    assert "the fractions among them sum to 1.2 > 1" in problems(data__rm_pairs=0.5, data__llm_queries=0.5,
                                                     data__test_pairs=0.2)


def test_all_problems_are_listed_at_once():
    text = problems(rm__epochs=0, apo__beta2=-1.0, model__dtype="bf17")
    assert text.count("\n  ") == 3 and "rm.epochs" in text and "apo.beta2" in text and "'bf17'" in text


def test_defaults_and_presets_are_valid():
    validate(Config())
    cfg = Config()
    cfg.data.rm_pairs, cfg.data.llm_queries, cfg.data.dev_pairs = 16, 12, 8
    validate(cfg)


def smoke_layout(**cluster) -> Config:
    cfg = Config()
    cfg.cluster.generator_cpus = cfg.cluster.scorer_cpus = 0.5
    for name, value in cluster.items():
        setattr(cfg.cluster, name, value)
    return cfg


def test_learner_resources_count_with_the_pools():
    cfg = smoke_layout(learner_cpus=3.5)
    assert total_demand(cfg) == {"CPU": 4.5}
    (problem,) = resource_problems(cfg, cluster_cpus=4, cluster_gpus=0)
    assert problem.startswith("cluster.num_generators=1 x cluster.generator_cpus=0.5 + cluster.num_scorers=1 x "
                              "cluster.scorer_cpus=0.5 + cluster.learner_workers=1 x cluster.learner_cpus=3.5 "
                              "needs 4.5 CPUs at once")
    assert problem.endswith("the Ray cluster has 4")
    assert resource_problems(smoke_layout(learner_cpus=3), cluster_cpus=4, cluster_gpus=0) == []


def test_gpus_of_scorers_and_learners_are_counted():
    cfg = smoke_layout(scorer_gpus=1.0)
    with pytest.raises(ConfigError, match=r"cluster.num_scorers=1 x cluster.scorer_gpus=1 needs 1 GPUs at once.*"
                                          r"the Ray cluster has 0"):
        validate(cfg, cluster_cpus=4, cluster_gpus=0)
    cfg = smoke_layout(generator_gpus=0.25, scorer_gpus=0.25, learner_use_gpu=True, learner_gpus=0.75)
    assert total_demand(cfg)["GPU"] == 1.25
    (problem,) = resource_problems(cfg, cluster_cpus=16, cluster_gpus=1)
    assert "cluster.learner_workers=1 x cluster.learner_gpus=0.75 needs 1.25 GPUs" in problem
    cfg.cluster.learner_use_gpu = False  # learner_gpus only counts for GPU learners
    assert resource_problems(cfg, cluster_cpus=16, cluster_gpus=1) == []


def test_an_actor_larger_than_every_node_is_refused():
    cfg = smoke_layout(learner_cpus=3)
    nodes = [{"CPU": 2.0}, {"CPU": 2.0}]  # 4 CPUs in all, but no node holds a 3-CPU learner
    (problem,) = resource_problems(cfg, cluster_cpus=4, cluster_gpus=0, node_resources=nodes)
    assert problem == ("each learner worker actor asks for cluster.learner_cpus=3; no single node of the Ray "
                       "cluster has that much (the largest has 2 CPUs)")


def test_custom_resources_place_roles_and_count_against_the_nodes_that_offer_them():
    """cluster.<role>_resources put a role on the nodes that offer those resources: the demand holds
    them, and a layout the nodes cannot hold is refused, naming the fields."""
    cfg = smoke_layout()
    cfg.cluster.generator_resources = {"apo_pool": 1.0}
    cfg.cluster.learner_resources = {"apo_pool": 1.0, "apo_learner": 1.0}
    assert total_demand(cfg) == {"CPU": 2.0, "apo_pool": 2.0, "apo_learner": 1.0}
    head, worker = {"CPU": 2.0}, {"CPU": 2.0, "apo_pool": 2.0, "apo_learner": 1.0}
    assert resource_problems(cfg, cluster_cpus=4, cluster_gpus=0, node_resources=[head, worker]) == []
    worker = {"CPU": 2.0, "apo_pool": 1.0}
    got = resource_problems(cfg, cluster_cpus=4, cluster_gpus=0, node_resources=[head, worker])
    assert ("cluster.num_generators=1 x cluster.generator_resources.apo_pool=1 + cluster.learner_workers=1 x "
            "cluster.learner_resources.apo_pool=1 needs 2 of the custom resource 'apo_pool' at once; the Ray "
            "cluster's nodes offer 1") in got[0]
    assert any("no single node of the Ray cluster has that much" in p and "0 apo_learner" in p for p in got), got


def _apo(*overrides: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/apo.py", "experiment=smoke", "run.in_process=true", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_refuses_bad_values_without_a_traceback(tmp_path, hh_data_path):
    proc = _apo("data.rm_pairs=abc", "eval.judge_concurrency=0", "rm.lr=inf", "cluster.max_actor_restarts=-1",
                f"data.path={hh_data_path}", f"run.output_dir={tmp_path}")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
    for message in (f"{RM_PAIRS_RULE}, got 'abc'", "eval.judge_concurrency must be >= 1, got 0",
                    "rm.lr must be a finite number > 0, got inf", "cluster.max_actor_restarts must be >= 0, got -1"):
        assert message in proc.stderr
    assert not (tmp_path / "phases").exists()  # refused before any work


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_refuses_splits_that_cannot_fit(tmp_path, hh_data_path):
    proc = _apo("data.llm_queries=4", "data.dev_pairs=8", f"data.path={hh_data_path}", f"run.output_dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data.dev_pairs=8 exceeds data.llm_queries=4" in proc.stderr
    # the same check with a fraction: only the data tells, and it is still a config error
    proc = _apo("data.llm_queries=4", "data.dev_pairs=0.5", f"data.path={hh_data_path}",
                f"run.output_dir={tmp_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "data.dev_pairs = " in proc.stderr and "exceeds data.llm_queries = 4" in proc.stderr
    assert not (tmp_path / "phases").exists()


def test_deepspeed_strategy_without_deepspeed_says_what_to_install(hide_package):
    from apo_ray.runtime.launch import require_extras

    hide_package("deepspeed")
    cfg = Config()
    cfg.cluster.learner_strategy = "deepspeed"
    with pytest.raises(ConfigError, match=r"cluster.learner_strategy=deepspeed needs DeepSpeed.*apo-ray\[deepspeed\]"):
        require_extras(cfg)
    cfg.run.in_process = True  # one process: no sharding, DeepSpeed is not used
    require_extras(cfg)
    cfg.run.in_process, cfg.cluster.learner_strategy = False, "fsdp"  # PyTorch's own: nothing to install
    require_extras(cfg)


@pytest.mark.parametrize("preset", sorted(p.stem for p in (ROOT / "conf" / "experiment").glob("*.yaml")))
def test_every_preset_answers_test_prompts_with_the_test_decoding(preset):
    # issue 21: hh_small sampled its test answers at T 1.0 (the schema default), not the paper's test
    # decoding; and gold answers must be cut to the samples' length budget (one budget for both).
    from apo_ray.config import PAPER_TEST_DECODING, compose

    cfg = compose([f"experiment={preset}"])
    testing = cfg.generation.testing
    assert {k: getattr(testing, k) for k in PAPER_TEST_DECODING} == PAPER_TEST_DECODING
    assert cfg.rm.max_response_tokens == cfg.generation.sampling.max_new_tokens, preset
