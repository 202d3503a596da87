"""run.output_dir on an S3 bucket: a local S3-compatible server (moto in server mode on 127.0.0.1)
spoken to with the real client library (s3fs/botocore over HTTP), credentials only in the
environment. The phase store's checks work there as on a folder; a run killed mid-way resumes from
the bucket to the records of an undisturbed run; the credentials appear in no log and no stored file.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from ray_nodes import free_port

pytest.importorskip("s3fs", reason="the s3 extra (pip install 'apo-ray[s3]')")
pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")

ROOT = Path(__file__).resolve().parents[1]
BUCKET = "apo-runs"


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server of our own on a free port; yields the environment that points the AWS
    client libraries at it, with fresh random credentials (moto accepts any)."""
    port = free_port()
    log = tmp_path_factory.mktemp("moto") / "moto.log"
    with open(log, "w") as fh:
        server = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                                  stdout=fh, stderr=subprocess.STDOUT)
    env = dict(os.environ, AWS_ACCESS_KEY_ID=f"apotest{secrets.token_hex(6)}",
               AWS_SECRET_ACCESS_KEY=secrets.token_hex(20), AWS_DEFAULT_REGION="us-east-1",
               AWS_ENDPOINT_URL=f"http://127.0.0.1:{port}")
    env.pop("AWS_PROFILE", None)
    try:
        client = boto3.client("s3", endpoint_url=env["AWS_ENDPOINT_URL"], region_name="us-east-1",
                              aws_access_key_id=env["AWS_ACCESS_KEY_ID"],
                              aws_secret_access_key=env["AWS_SECRET_ACCESS_KEY"])
        deadline = time.time() + 60
        while True:
            try:
                client.create_bucket(Bucket=BUCKET)
                break
            except Exception:  # noqa: BLE001 - not listening yet
                assert server.poll() is None and time.time() < deadline, log.read_text()[-2000:]
                time.sleep(0.5)
        yield {"env": env, "client": client}
    finally:
        server.kill()  # by PID: only the server this fixture started
        server.wait(timeout=30)


def _objects(client, prefix: str) -> dict[str, dict]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"]: o for page in pages for o in page.get("Contents", [])}


def test_phase_store_on_s3_checks_and_quarantines_like_a_folder(s3, monkeypatch):
    """Phase files and a weights file in the bucket; a bit-flipped phase is moved aside to .corrupt
    and reads as missing; a second run without run.resume is refused."""
    import torch

    from apo_ray.config import Config
    from apo_ray.game.store import ResumeError, check_store, open_store
    from apo_ray.runtime.in_process import InProcessSystem

    for key, value in s3["env"].items():
        if key.startswith("AWS_"):
            monkeypatch.setenv(key, value)
    cfg = Config()
    cfg.run.in_process = True
    cfg.run.output_dir = f"s3://{BUCKET}/unit-{secrets.token_hex(4)}"
    store = open_store(cfg, InProcessSystem(cfg))
    store.put("samples/x", [["a", "b"]])
    weights = store.put_version("rm/base", {"w": torch.arange(6.0).reshape(2, 3)}, {"loss": 0.5})
    assert weights.checkpoint == f"{cfg.run.output_dir}/phases/rm__base.safetensors"
    assert store.get("samples/x") == [["a", "b"]]
    assert torch.equal(store.get_version("rm/base").handle["w"], torch.arange(6.0).reshape(2, 3))
    assert store.weights_keys() == ["rm/base"]
    prefix = cfg.run.output_dir.removeprefix(f"s3://{BUCKET}/")
    body = s3["client"].get_object(Bucket=BUCKET, Key=f"{prefix}/phases/samples__x.json")["Body"].read()
    s3["client"].put_object(Bucket=BUCKET, Key=f"{prefix}/phases/samples__x.json", Body=body.replace(b'"a"', b'"A"'))
    assert store.get("samples/x") is None
    assert f"{prefix}/phases/samples__x.json.corrupt" in _objects(s3["client"], prefix)
    with pytest.raises(ResumeError, match="pass run.resume=true"):
        check_store(cfg)


def _apo(out: str, *extra: str) -> list[str]:
    return [sys.executable, "jobs/apo.py", "experiment=smoke", "apo.rounds=1", "run.in_process=true",
            f"run.output_dir={out}", *extra]


def _comparable(records: list[dict]) -> list[tuple]:
    return [(r["round"], r["rm_mode"], r["rm"], r["policy"], round(r["rm_test_acc"], 6), round(r["rm_dev_acc"], 6),
             round(r["rm_test_ece"], 6), round(r["policy_mean_reward"], 5)) for r in records]


@pytest.mark.slow
@pytest.mark.timeout(2400)
def test_a_run_killed_mid_way_resumes_from_the_bucket(s3, tmp_path):
    """An undisturbed smoke round and a second one SIGKILLed once RM_Base is in the bucket, then
    resumed with run.resume=true from the bucket alone: the same records, RM_Base not recomputed,
    the summary, report and exported models in the bucket, and the secret key in no output."""
    client, env = s3["client"], dict(s3["env"], APO_TEST_THREADS="1")
    secret = env["AWS_SECRET_ACCESS_KEY"]
    logs = []

    def run(out: str, *extra: str, cwd: Path) -> subprocess.CompletedProcess:
        cwd.mkdir(parents=True, exist_ok=True)  # Hydra's own folder (.hydra/, its log) goes here
        proc = subprocess.run(_apo(out, f"hydra.run.dir={cwd}", *extra), cwd=ROOT, capture_output=True, text=True,
                              timeout=900, env=env, check=False)
        logs.append(proc.stdout + proc.stderr)
        assert proc.returncode == 0, (proc.stdout + proc.stderr)[-5000:]
        return proc

    run(f"s3://{BUCKET}/ref", cwd=tmp_path / "hydra-ref")
    reference = json.loads(client.get_object(Bucket=BUCKET, Key="ref/summary.json")["Body"].read())

    (tmp_path / "hydra-run").mkdir()
    with open(tmp_path / "killed.log", "w") as fh:
        job = subprocess.Popen(_apo(f"s3://{BUCKET}/run", f"hydra.run.dir={tmp_path / 'hydra-run'}"), cwd=ROOT,
                               stdout=fh, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    try:
        deadline = time.time() + 600
        while "run/phases/rm__base.json" not in _objects(client, "run/phases/"):
            assert job.poll() is None, (tmp_path / "killed.log").read_text()[-4000:]
            assert time.time() < deadline, "RM_Base never reached the bucket"
            time.sleep(0.1)
        os.killpg(job.pid, signal.SIGKILL)  # its own session: the run and its export child, nothing else
    finally:
        if job.poll() is None:
            os.killpg(job.pid, signal.SIGKILL)
        job.wait(timeout=60)
    logs.append((tmp_path / "killed.log").read_text())
    before = _objects(client, "run/")
    assert "run/summary.json" not in before and "run/phases/rm__base.safetensors" in before

    run(f"s3://{BUCKET}/run", "run.resume=true", cwd=tmp_path / "hydra-resume")
    after = _objects(client, "run/")
    assert _comparable(json.loads(client.get_object(Bucket=BUCKET, Key="run/summary.json")["Body"].read())) == \
        _comparable(reference)
    for key in ("run/phases/rm__base.json", "run/phases/rm__base.safetensors"):  # not recomputed
        assert after[key]["ETag"] == before[key]["ETag"] and after[key]["LastModified"] == before[key]["LastModified"]
    assert {"run/report.md", "run/resolved_config.json", "run/run_timing.json", "run/models/index.json",
            "run/models/policy/apo/r1/model.safetensors"} <= set(after)
    index = json.loads(client.get_object(Bucket=BUCKET, Key="run/models/index.json")["Body"].read())
    assert index["versions"]["policy/apo/r1"]["folder"] == f"s3://{BUCKET}/run/models/policy/apo/r1"

    # the credentials: in no log, no stored object, no file Hydra wrote
    assert not any(secret in text for text in logs)
    for key in after:
        assert secret.encode() not in client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), key
    for path in tmp_path.rglob("*"):
        assert not path.is_file() or secret.encode() not in path.read_bytes(), path
