"""docker-compose.yml: no Docker engine here, so check its structure (CI also runs `docker compose
config` where a client with the compose plugin exists)."""

from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def test_compose_has_a_head_with_local_dashboard_and_gpu_workers():
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    head, worker = compose["services"]["ray-head"], compose["services"]["ray-worker"]
    assert "--head" in head["command"] and "--metrics-export-port" in head["command"]
    # the dashboard (and job submission) is published on localhost unless APO_DASHBOARD_BIND says otherwise
    assert any(p.startswith("${APO_DASHBOARD_BIND:-127.0.0.1}:8265:") for p in head["ports"])
    assert "ray-head:6379" in worker["command"]
    devices = worker["deploy"]["resources"]["reservations"]["devices"]
    assert devices[0]["capabilities"] == ["gpu"]
    assert (ROOT / "Dockerfile").exists() and "[vllm,deepspeed,offline,s3]" in (ROOT / "Dockerfile").read_text()


def test_compose_places_roles_like_the_multinode_test():
    """The head offers apo_head and the workers apo_worker, the custom resources the README's
    cluster command and tests/test_multinode.py place the roles with."""
    from test_multinode import LAYOUT

    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    head, worker = compose["services"]["ray-head"]["command"], compose["services"]["ray-worker"]["command"]
    assert "--resources='{\"apo_head\": 8}'" in head and "--resources='{\"apo_worker\": 8}'" in worker
    text = (ROOT / "docker-compose.yml").read_text()
    for override in LAYOUT:  # the documented submit command places the roles as the test does
        assert override in text, override
    assert "AWS_SECRET_ACCESS_KEY: ${AWS_SECRET_ACCESS_KEY:-}" in text  # from the shell, never written down


def test_sweep_jobs_upload_the_whole_package_but_not_the_run_folders():
    """jobs/sweep.py's working-dir excludes, matched by Ray's own matcher (gitignore patterns over
    paths relative to the working dir; private, but it is what decides the upload): "outputs/"
    unanchored also dropped apo_ray/outputs/, and every sweep job died on `import apo_ray.outputs`."""
    import importlib.util

    from ray._private.runtime_env.packaging import _get_excludes

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "jobs" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    match = _get_excludes(ROOT, sweep.WORKING_DIR_EXCLUDES)
    package = list((ROOT / "apo_ray").rglob("*.py"))
    assert ROOT / "apo_ray" / "outputs" / "claims.py" in package and not [p for p in package if match(p)]
    assert all(match(ROOT / p) for p in ("outputs/demo/summary.json", "multirun/x/y.json", ".git/HEAD",
                                         ".gpu-bundle/wheel.whl"))
