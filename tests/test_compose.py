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
    assert (ROOT / "Dockerfile").exists() and "[vllm,deepspeed,offline]" in (ROOT / "Dockerfile").read_text()
