"""Output folders (apo_ray.ownership): a run writes only into a folder that is new, empty or a run's
own, never into `/`, the home folder or the checkout, and one run at a time holds a folder; OS
errors name their cause."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

from apo_ray.game import ownership
from apo_ray.game.ownership import LOCK, MARKER, OwnershipError, check_ownership, claim_output_dir

ROOT = Path(__file__).resolve().parents[1]


def _apo(*overrides: str, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "jobs/apo.py", "experiment=smoke", "run.in_process=true", *overrides],
                          cwd=ROOT, capture_output=True, text=True, timeout=timeout, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))


def _snapshot(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_a_users_folder_is_refused_naming_its_files_and_left_untouched(tmp_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.md").write_text("notes")
    (d / "summary.json").write_text("{}")
    before = _snapshot(d)
    with pytest.raises(OwnershipError, match=r"holds files that no apo_ray run wrote \(report\.md, summary\.json"), \
            claim_output_dir(d):
        pytest.fail("entered a folder that is not the run's")
    assert _snapshot(d) == before  # no marker, no lock left behind


@pytest.mark.parametrize("where", ["root", "home", "checkout"])
def test_root_home_and_the_checkout_are_refused(where):
    folder = {"root": Path("/"), "home": Path.home(), "checkout": ROOT}[where]
    why = {"root": "filesystem root", "home": "home folder", "checkout": "checkout"}[where]
    with pytest.raises(OwnershipError, match=why):
        check_ownership(folder)
    assert not (folder / MARKER).exists()


def test_new_and_empty_folders_are_marked_and_reused_and_hydras_files_are_not_the_users(tmp_path):
    new = tmp_path / "a" / "new"
    with claim_output_dir(new) as folder:
        assert (folder / MARKER).is_file() and (folder / LOCK).is_file()
        (folder / "summary.json").write_text("{}")
    assert not (new / LOCK).exists()  # released
    with claim_output_dir(new):  # the run's own folder again (a resume): accepted
        pass
    hydra = tmp_path / "hydra"
    (hydra / ".hydra").mkdir(parents=True)
    (hydra / "apo.log").write_text("")
    with pytest.raises(OwnershipError, match=r"\.hydra/, apo\.log"):
        check_ownership(hydra)
    with claim_output_dir(hydra, ignore={".hydra", "apo.log"}):
        pass
    # a run from before the marker existed is a run's folder too
    legacy = tmp_path / "legacy"
    (legacy / "phases").mkdir(parents=True)
    (legacy / "phases" / "fingerprint.json").write_text("{}")
    (legacy / "summary.json").write_text("[]")
    assert check_ownership(legacy) is True


def test_a_second_run_is_kept_out_of_a_busy_folder_with_the_holder_named(tmp_path):
    with claim_output_dir(tmp_path / "run"):
        with pytest.raises(OwnershipError, match=rf"in use by another run \(pid {os.getpid()} on host "
                                                 rf"{socket.gethostname()}.*wait for it to finish"), \
                claim_output_dir(tmp_path / "run"):
            pass
        assert (tmp_path / "run" / LOCK).exists()  # the refused run did not remove the holder's lock


def test_a_stale_lock_of_a_dead_process_is_taken_over(tmp_path, caplog):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True,
                          check=True)
    pid = int(dead.stdout)
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / MARKER).write_text("{}")
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": pid, "since": 0, "token": "x"}))
    with claim_output_dir(folder):
        assert json.loads((folder / LOCK).read_text())["pid"] == os.getpid()
    assert f"pid {pid}" in caplog.text and "stale" in caplog.text
    # a live pid whose process started at another time (a reused pid) is stale too
    (folder / LOCK).write_text(json.dumps({"host": socket.gethostname(), "pid": os.getpid(), "start_ticks": 1,
                                           "token": "y"}))
    with claim_output_dir(folder):
        pass


def test_another_hosts_lock_is_not_guessed_stale(tmp_path):
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / LOCK).write_text(json.dumps({"host": "other-node", "pid": 1, "since": 0, "token": "z"}))
    with pytest.raises(OwnershipError, match=rf"pid 1 on host other-node.*delete {folder / LOCK}"), \
            claim_output_dir(folder):
        pass


def test_os_errors_name_their_cause(tmp_path, monkeypatch):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    with pytest.raises(OwnershipError, match="is not a directory"):
        check_ownership(a_file)
    with pytest.raises(OwnershipError, match=r"Not a directory \(ENOTDIR\)"), claim_output_dir(a_file / "run"):
        pass

    def full(path, data):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    monkeypatch.setattr("apo_ray.game.ownership.write_durably", full)
    with pytest.raises(OwnershipError, match=rf"cannot write {MARKER}: .*No space left on device \(ENOSPC\)"), \
            claim_output_dir(tmp_path / "full"):
        pass
    assert not (tmp_path / "full" / LOCK).exists()
    assert ownership.os_cause(PermissionError(errno.EACCES, "Permission denied", "/x")) == \
        "/x: Permission denied (EACCES)"


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_refuses_a_users_folder_and_root_and_a_busy_folder(tmp_path, hh_data_path):
    d = tmp_path / "d"
    d.mkdir()
    (d / "report.md").write_text("notes")
    (d / "summary.json").write_text("{}")
    before = _snapshot(d)
    proc = _apo(f"run.output_dir={d}", f"data.path={hh_data_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "report.md, summary.json" in proc.stderr and "refusing to write into it" in proc.stderr
    assert _snapshot(d) == before

    proc = _apo("run.output_dir=/", f"data.path={hh_data_path}")
    assert proc.returncode != 0 and "filesystem root" in proc.stderr, proc.stderr[-3000:]
    assert not Path("/resolved_config.json").exists() and not Path("/phases").exists()

    # a second `run.resume=true` while the folder's run is going (here: this test holds its lock)
    with claim_output_dir(tmp_path / "busy"):
        proc = _apo(f"run.output_dir={tmp_path / 'busy'}", "run.resume=true", f"data.path={hh_data_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert f"in use by another run (pid {os.getpid()}" in proc.stderr


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_names_the_os_cause(tmp_path, hh_data_path):
    a_file = tmp_path / "file"
    a_file.write_text("x")
    proc = _apo(f"run.output_dir={a_file}/run", f"data.path={hh_data_path}")
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "Not a directory (ENOTDIR)" in proc.stderr and str(a_file) in proc.stderr


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_the_readmes_output_dir_under_hydras_own_folder_is_accepted(tmp_path, hh_data_path):
    """The README's `run.output_dir=$PWD/outputs/demo`: Hydra makes its job folder
    `outputs/<run.name>/<time>/` inside it before the run starts; that folder is Hydra's, not the
    user's, so the run goes on (it was refused, naming the timestamp folder)."""
    out = tmp_path / "outputs" / "smoke"
    proc = subprocess.run([sys.executable, str(ROOT / "jobs/apo.py"), "experiment=smoke", "run.in_process=true",
                           "apo.rounds=1", "apo.arms=[fixed]", "run.save_models=none", f"run.output_dir={out}",
                           f"data.path={hh_data_path}"],
                          cwd=tmp_path, capture_output=True, text=True, timeout=600, check=False,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert proc.returncode == 0, proc.stderr[-3000:]
    hydra_folders = [p for p in out.iterdir() if (p / ".hydra").is_dir()]
    assert len(hydra_folders) == 1 and (out / MARKER).exists() and (out / "summary.json").exists()
