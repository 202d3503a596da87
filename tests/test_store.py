"""The checkpoint (apo_ray.game.store): durable phase files, corrupt phases recomputed, and the resume
fingerprint that refuses what would change results."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_ray.config import Config
from apo_ray.game import digests as digests_module
from apo_ray.game import store as store_module
from apo_ray.game.store import PhaseStore, ResumeError, check_store, file_digest, open_store
from apo_ray.runtime.in_process import InProcessSystem

ROOT = Path(__file__).resolve().parents[1]
TINY_MODEL = "tiny-random-llama"


@pytest.fixture(autouse=True)
def own_digest_cache(tmp_path, monkeypatch):
    """File digests cached in this test's folder, not in the user's ~/.cache. The converted models
    already in the user's cache are linked in: the fingerprint digests the run's model files, and
    converting SmolLM2 again in every test would only cost time."""
    from apo_ray.models.loading import cache_dir

    own = tmp_path / "cache"
    own.mkdir()
    for folder in cache_dir().glob("*"):
        if (folder / "config.json").exists():
            (own / folder.name).symlink_to(folder.resolve())
    monkeypatch.setenv("APO_RAY_CACHE", str(own))
    monkeypatch.setattr(digests_module, "_digests", {})


def weights_store(root: Path) -> PhaseStore:
    return PhaseStore(root, InProcessSystem(Config()))  # InProcessSystem loads no model until asked to generate


STATE = {"w": torch.arange(1000, dtype=torch.float32), "b": torch.ones(3)}


# ------------------------------------------------------------------------------ durable phase files


def test_phase_files_are_fsynced_before_and_after_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(store_module.os, "fsync",
                        lambda fd: (events.append(("fsync", Path(os.readlink(f"/proc/self/fd/{fd}")).name)),
                                    real_fsync(fd)))
    monkeypatch.setattr(store_module.os, "replace",
                        lambda a, b: (events.append(("rename", Path(a).name, Path(b).name)), real_replace(a, b)))
    store = weights_store(tmp_path / "phases")
    store.put("samples/policy/init/gold", [["a", "b"]])
    assert events == [("fsync", "samples__policy__init__gold.json.tmp"),
                      ("rename", "samples__policy__init__gold.json.tmp", "samples__policy__init__gold.json"),
                      ("fsync", "phases")]
    events.clear()
    store.put_version("rm/base", STATE, {"loss": 1.0})
    # the weights (InProcessSystem writes them under a temporary name) are on disk, file and folder entry,
    # before the marker that says they are complete
    assert events == [("rename", "rm__base.safetensors.tmp", "rm__base.safetensors"), ("fsync", "rm__base.safetensors"),
                      ("fsync", "phases"),
                      ("fsync", "rm__base.json.tmp"),
                      ("rename", "rm__base.json.tmp", "rm__base.json"), ("fsync", "phases")]


def test_marker_holds_the_size_and_checksum_of_the_weights(tmp_path):
    store = weights_store(tmp_path)
    store.put_version("rm/base", STATE, {"loss": 1.0})
    marker = json.loads((tmp_path / "rm__base.json").read_text())
    pt = tmp_path / "rm__base.safetensors"
    assert marker["value"] == {"loss": 1.0} and marker["weights"]["bytes"] == pt.stat().st_size
    assert marker["weights"]["sha256"] == store_module.file_sha256(pt)[1]
    assert pt.stat().st_mode & 0o777 == (tmp_path / "rm__base.json").stat().st_mode & 0o777  # the umask's, not 0600
    loaded = store.get_version("rm/base")
    assert loaded.id == "rm/base" and torch.equal(loaded.handle["w"], STATE["w"])


@pytest.mark.parametrize("damage", ["truncate", "garbage", "edited value", "old format"])
def test_a_corrupt_json_phase_is_moved_aside_and_recomputed(tmp_path, caplog, damage):
    store = weights_store(tmp_path)
    store.put("scores/rm/base/dev/chosen", [0.5, 0.25])
    path = tmp_path / "scores__rm__base__dev__chosen.json"
    text = path.read_text()
    path.write_bytes({"truncate": text[: len(text) // 2].encode(), "garbage": b"\xff\xfe\x00 not UTF-8",
                      "edited value": text.replace("0.25", "0.75").encode(), "old format": b"[0.5, 0.25]"}[damage])
    assert store.get("scores/rm/base/dev/chosen") is None  # so the game computes it again
    assert str(path) in caplog.text and "computed again" in caplog.text
    assert not path.exists() and path.with_name(path.name + ".corrupt").exists()  # kept for a post-mortem
    store.put("scores/rm/base/dev/chosen", [0.5, 0.25])
    assert store.get("scores/rm/base/dev/chosen") == [0.5, 0.25]


@pytest.mark.parametrize("damage", ["truncate", "flip a byte", "delete"])
def test_a_corrupt_weights_file_is_moved_aside_and_recomputed(tmp_path, caplog, damage):
    store = weights_store(tmp_path)
    store.put_version("policy/apo/r1", STATE, {"loss": 1.0})
    pt = tmp_path / "policy__apo__r1.safetensors"
    data = pt.read_bytes()
    if damage == "truncate":
        pt.write_bytes(data[: len(data) // 2])
    elif damage == "flip a byte":
        pt.write_bytes(data[:-100] + bytes([data[-100] ^ 1]) + data[-99:])
    else:
        pt.unlink()
    assert store.get_version("policy/apo/r1") is None
    assert "policy__apo__r1.safetensors" in caplog.text and "computed again" in caplog.text
    assert not (tmp_path / "policy__apo__r1.json").exists()


def test_game_recomputes_exactly_the_corrupt_phases(tiny_cfg_factory, tmp_path, caplog):
    from test_game import play  # the recording game runner of the game tests

    cfg = tiny_cfg_factory(apo__arms=["fixed"], apo__rounds=1)
    first = play(cfg, tmp_path)
    (tmp_path / "policy__fixed__r1.safetensors").write_bytes(b"torn")  # a truncated checkpoint
    answers = tmp_path / "samples__policy__init__test.json"
    answers.write_text(answers.read_text()[:-20])
    again = play(cfg, tmp_path)
    calls = again.system.calls
    assert [c[1] for c in calls if c[0] == "train_policy"] == ["policy/init"]  # redone, nothing else trained
    assert [c[1] for c in calls if c[0] == "generate"] == ["policy/init"]  # only the torn test answers
    assert "samples__policy__init__test.json" in caplog.text and "policy__fixed__r1.safetensors" in caplog.text
    for a, b in zip(first.records, again.records):
        assert a["policy_mean_reward"] == pytest.approx(b["policy_mean_reward"], abs=1e-6)
    assert torch.equal(first.weights("policy/fixed/r1")["lm_head.weight"],
                       again.weights("policy/fixed/r1")["lm_head.weight"])


# ------------------------------------------------------------------------------ the fingerprint


def run_cfg(out: Path, data: Path | None = None, **overrides) -> Config:
    cfg = Config()
    cfg.run.output_dir = str(out)
    cfg.data.path = str(data) if data else str(out / "no-data.jsonl")
    for dotted, value in overrides.items():
        section, name = dotted.split("__")
        setattr(getattr(cfg, section), name, value)
    return cfg


def started_run(out: Path, **overrides) -> Config:
    cfg = run_cfg(out, **overrides)
    open_store(cfg, system=None).put("samples/policy/init/gold", [["a"]])
    cfg.run.resume = True
    return cfg


@pytest.mark.parametrize(("field", "value", "named"), [
    ("cluster__generator_cpus", 2.0, "cluster.generator_cpus"),
    ("cluster__learner_workers", 2, "cluster.learner_workers"),
    ("cluster__learner_use_gpu", True, "cluster.learner_use_gpu"),
    ("run__in_process", True, "in_process"),
])
def test_resume_refuses_cluster_layouts_that_change_results(tmp_path, field, value, named):
    cfg = started_run(tmp_path)
    section, name = field.split("__")
    setattr(getattr(cfg, section), name, value)
    with pytest.raises(ResumeError, match=rf"differ from the run in .*: .*{named}"):
        check_store(cfg)


def test_resume_accepts_what_does_not_change_results(tmp_path):
    cfg = started_run(tmp_path)
    # pool sizes (samples are seeded per batch, not per actor), restarts, waits, more rounds, the judge
    cfg.cluster.num_generators, cfg.cluster.num_scorers, cfg.cluster.max_actor_restarts = 4, 3, 9
    cfg.cluster.resource_wait_s, cfg.apo.rounds, cfg.eval.judge = 5.0, 7, True
    assert open_store(cfg, system=None).get("samples/policy/init/gold") == [["a"]]


def test_resume_refuses_changed_data_and_golden_files(tmp_path):
    data, gold = tmp_path / "pairs.jsonl", tmp_path / "gold.jsonl"
    data.write_text('{"prompt": "q", "chosen": "a", "rejected": "b"}\n')
    gold.write_text('{"prompt": "q", "response": "g"}\n')
    cfg = started_run(tmp_path / "run", data=data, data__golden_path=str(gold))
    check_store(cfg)
    with open(gold, "a") as fh:  # the golden file grew: later rounds would see other gold
        fh.write('{"prompt": "q2", "response": "g2"}\n')
    with pytest.raises(ResumeError, match=r"files\.data\.golden_path"):
        check_store(cfg)
    gold.write_text('{"prompt": "q", "response": "g"}\n')
    data.write_text('{"prompt": "q", "chosen": "A", "rejected": "b"}\n')  # same size, other content
    os.utime(data, ns=(data.stat().st_atime_ns, data.stat().st_mtime_ns + 10**9))
    with pytest.raises(ResumeError, match=r"files\.data\.path"):
        check_store(cfg)


def test_folder_digest_covers_every_data_file(tmp_path):
    folder = tmp_path / "hh"
    (folder / "a").mkdir(parents=True)
    (folder / "a" / "x.jsonl").write_text("{}\n")
    cfg = started_run(tmp_path / "run", data=folder)
    (folder / "a" / "y.jsonl").write_text("{}\n")  # a new file in the data folder
    with pytest.raises(ResumeError, match=r"files\.data\.path"):
        check_store(cfg)


def test_file_digest_is_cached_by_path_size_and_mtime(tmp_path):
    f = tmp_path / "big.jsonl"
    f.write_bytes(b"x" * 1000)
    first = file_digest(f)
    stat = f.stat()
    f.write_bytes(b"y" * 1000)  # same size; the old mtime put back: the cached digest is used, no read
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns))
    assert file_digest(f) == first
    digests_module._digests.clear()  # a new process: the digest comes from the cache file
    assert file_digest(f) == first
    os.utime(f, ns=(stat.st_atime_ns, stat.st_mtime_ns + 1))
    assert file_digest(f) != first  # a new mtime: read again


def test_deleted_fingerprint_beside_phases_is_refused_not_rewritten(tmp_path):
    cfg = started_run(tmp_path)
    (tmp_path / "phases" / "fingerprint.json").unlink()
    with pytest.raises(ResumeError, match=r"fingerprint\.json is missing but .* holds 1 phase files"):
        open_store(cfg, system=None)
    assert not (tmp_path / "phases" / "fingerprint.json").exists()


def test_torn_fingerprint_is_a_clear_error_naming_the_file(tmp_path):
    cfg = started_run(tmp_path)
    marker = tmp_path / "phases" / "fingerprint.json"
    marker.write_text(marker.read_text()[:40])
    with pytest.raises(ResumeError, match=rf"{marker} is unreadable \(JSONDecodeError"):
        open_store(cfg, system=None)


@pytest.mark.parametrize("folder", ["missing", "empty"])
def test_resume_of_nothing_is_an_error(tmp_path, folder):
    out = tmp_path / "out"
    if folder == "empty":
        (out / "phases").mkdir(parents=True)
    cfg = run_cfg(out, run__resume=True)
    with pytest.raises(ResumeError, match=r"holds no earlier run to continue.*run\.output_dir.*timestamp"):
        open_store(cfg, system=None)


def test_fresh_run_refuses_a_folder_with_phases(tmp_path):
    cfg = started_run(tmp_path)
    cfg.run.resume = False
    with pytest.raises(ResumeError, match=r"pass run\.resume=true"):
        open_store(cfg, system=None)


@pytest.mark.slow  # runs jobs/apo.py in a subprocess
def test_main_job_resume_without_output_dir_says_how(tmp_path, hh_data_path):
    """The Hydra entry: a resume into Hydra's fresh timestamped folder stops, no traceback."""
    proc = subprocess.run([sys.executable, "jobs/apo.py", "experiment=smoke", "run.in_process=true", "run.resume=true",
                           f"data.path={hh_data_path}", f"hydra.run.dir={tmp_path}/outputs/2026-01-01_00-00-00"],
                          cwd=ROOT, capture_output=True, text=True, timeout=300, check=False)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr, proc.stderr[-3000:]
    assert "holds no earlier run to continue" in proc.stderr and "run.output_dir" in proc.stderr
    assert not (tmp_path / "outputs" / "2026-01-01_00-00-00" / "phases" / "fingerprint.json").exists()


# ------------------------------------------------------------------------------ checkpoints store what changed


def _same(a: dict, b: dict) -> bool:
    """Equal state dicts, bit for bit: names in order, dtypes, shapes and values."""
    return list(a) == list(b) and all(a[k].dtype == b[k].dtype and torch.equal(a[k], b[k]) for k in a)


def _stored_names(path: Path) -> set[str]:
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as fh:
        return set(fh.keys())


def test_a_checkpoint_holds_what_its_phase_trained_and_rebuilds_the_rest_exactly(tmp_path, tiny_model, hh_pairs):
    """Real learners on the 2-block tiny model with trainable_layers=1: each checkpoint holds block 1,
    the final norm and the head, nothing of block 0 or the (tied) embedding, and names its base;
    the store reads back the learner's full state dict bit for bit, through a chain of two versions
    from the base model, for an RM (random head) and a policy (tied LM head)."""
    from apo_ray.data import RankedPair
    from apo_ray.models.training import TrainSettings, train_policy, train_reward_model

    settings = TrainSettings(lr=1e-3, examples_per_step=4, micro_examples=4, max_length=96, precision="fp32",
                             seed=0, trainable_layers=1)
    pairs = [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in hh_pairs[:8]]
    examples = [(p.prompt, p.chosen) for p in hh_pairs[:8]]
    store = weights_store(tmp_path)
    for role, train, data in (("rm", train_reward_model, pairs), ("policy", train_policy, examples)):
        base = {"rm": "rm/pretrained", "policy": "policy/init"}[role]
        state = None
        for key in (f"{role}/base", f"{role}/apo/r1"):
            state, stats = train(TINY_MODEL, state, data, settings)
            trained = stats.pop("trained_tensors")
            store.put_version(key, state, stats, base=base, base_model=TINY_MODEL, trained=trained)
            path = store.version_path(key)
            assert path.suffix == ".safetensors"
            assert _stored_names(path) == set(trained)
            assert trained and all(n.startswith(("model.layers.1.", "model.norm.", "score.", "lm_head."))
                                   for n in trained), trained
            assert not any(n.startswith(("model.layers.0.", "model.embed_tokens.")) for n in trained)
            assert json.loads((tmp_path / f"{key.replace('/', '__')}.json").read_text())["weights"]["base"] == base
            assert _same(store_module.load_checkpoint(path), state), key  # the full state dict, exactly
            assert _same(store.get_version(key).handle, state), key
            base = key
        full = sum(t.numel() * t.element_size() for t in state.values())
        assert path.stat().st_size < 0.8 * full  # the tiny model's block 0 and embedding are left out


def test_frozen_tensors_come_back_in_the_dtype_the_learner_held_them(tmp_path):
    """A learner that holds frozen weights in bf16 (DeepSpeed's bf16 modes) hands back the base's fp32
    values rounded to bf16: the checkpoint records the dtype and the rebuild casts to it."""
    store = weights_store(tmp_path)
    base = {"a": torch.randn(64), "b": torch.randn(8, 8)}
    store.put_version("rm/base", base, {})  # no base: complete in itself
    child = {"a": base["a"].to(torch.bfloat16), "b": torch.randn(8, 8)}
    store.put_version("rm/apo/r1", child, {}, base="rm/base", base_model="unused", trained=["b"])
    assert _stored_names(store.version_path("rm/apo/r1")) == {"b"}
    assert _same(store.get_version("rm/apo/r1").handle, child)


def test_a_changed_or_missing_base_is_named_not_silently_used(tmp_path):
    store = weights_store(tmp_path)
    store.put_version("rm/base", STATE, {})
    child = {"w": STATE["w"], "b": STATE["b"] * 2}
    store.put_version("rm/apo/r1", child, {}, base="rm/base", base_model="unused", trained=["b"])
    base_file = store.version_path("rm/base")
    from safetensors.torch import load_file, save_file

    edited = load_file(str(base_file))
    edited["w"][0] += 1
    save_file(edited, str(base_file), metadata={"format": store_module.CHECKPOINT_FORMAT, "base": "", "base_model": "",
                                                "layout": json.dumps([["w", "float32", [1000]], ["b", "float32", [3]]])})
    with pytest.raises(ValueError, match="rm__base.safetensors is not the file rm__base.json recorded"):
        store_module.load_checkpoint(store.version_path("rm/apo/r1"))
    base_file.unlink()
    with pytest.raises(FileNotFoundError, match=r"its base version rm/base \(rm__base.safetensors\) is missing"):
        store_module.load_checkpoint(store.version_path("rm/apo/r1"))


def test_a_run_folder_of_full_pt_checkpoints_still_reads(tmp_path):
    """Run folders written before (a full ``<key>.pt`` per version, no "file" in the marker) resume
    and export: the old file is read whole, and a new version may name it as its base."""
    store = weights_store(tmp_path)
    pt = tmp_path / "rm__base.pt"
    torch.save(STATE, pt)
    size, sha256 = store_module.file_sha256(pt)
    store.put("rm/base", {"loss": 1.0}, weights={"bytes": size, "sha256": sha256})
    assert store.weights_keys() == ["rm/base"] and store.version_path("rm/base") == pt
    assert _same(store.get_version("rm/base").handle, STATE)
    child = {"w": STATE["w"] + 1, "b": STATE["b"]}
    store.put_version("rm/apo/r1", child, {}, base="rm/base", base_model="unused", trained=["w"])
    assert _same(store.get_version("rm/apo/r1").handle, child)
