"""What a user takes away from a run: Hugging Face folders of every model version, tracker logs
(TensorBoard, MLflow, W&B offline), the per-phase progress lines, and the sweep report.

One Hydra multirun of `experiment=smoke` in process over two beta2 values (one round, arms fixed and
apo, an evaluation RM, every model exported, every tracker on) serves the module; each test reads
back what it left with the trackers' and transformers' own readers.
"""

from __future__ import annotations

import json
import os
import re
import shlex
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from apo_ray.game.store import load_checkpoint

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "jobs"))

BETA2 = (1.0, 10.0)
TRACKERS = "[tensorboard,mlflow,wandb]"
ALL_TRACKERS = pytest.mark.skipif(
    any(__import__("importlib").util.find_spec(m) is None for m in ("tensorboard", "mlflow", "wandb")),
    reason="needs the tracker extras: pip install 'apo-ray[tracking]'")


@pytest.fixture(scope="module")
def sweep(tmp_path_factory, tiny_model, hh_data_path):
    """The multirun's folder, its output, and the config of point 0."""
    root = tmp_path_factory.mktemp("sweep")
    cmd = [sys.executable, "jobs/apo.py", "-m", "experiment=smoke", "run.in_process=true", "apo.rounds=1",
           "apo.arms=[fixed,apo]", "eval.eval_rm=true", "data.eval_rm_pairs=8", "run.save_models=all",
           f"run.tracking={TRACKERS}", f"data.path={hh_data_path}", f"hydra.sweep.dir={root}",
           f"eval.shared_rm_dir={root / 'eval_rms'}",  # point 0 trains the evaluation RM, point 1 reuses it
           "apo.beta2=" + ",".join(str(b) for b in BETA2)]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=1500, check=False)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    return {"root": root, "log": proc.stdout + proc.stderr, "run": root / "0"}


def _cfg(run: Path):
    from omegaconf import OmegaConf

    from apo_ray.config import from_omegaconf

    return from_omegaconf(OmegaConf.create(json.loads((run / "resolved_config.json").read_text())))


def _store(run: Path):
    from apo_ray.game.store import PhaseStore
    return PhaseStore(run / "phases", system=None)


def _texts(run: Path) -> tuple[list[str], list[str]]:
    """Prompts and responses to score and run through the models: the run's test prompts and answers."""
    from apo_ray.game.game_data import build_game_data, eval_prompts
    cfg = _cfg(run)
    prompts = eval_prompts(cfg, build_game_data(cfg))
    answers = [a[0] for a in _store(run).get("samples/policy/apo/r1/test")]
    return prompts, answers


# -- Hugging Face export -----------------------------------------------------------------------------


def test_every_model_version_is_exported(sweep):
    run = sweep["run"]
    index = json.loads((run / "models" / "index.json").read_text())
    stored = _store(run).weights_keys()
    assert stored == sorted(["rm/base", "rm/eval", "rm/apo/r1", "policy/fixed/r1", "policy/apo/r1"])
    assert sorted(index["versions"]) == stored and index["errors"] == {}
    assert index["versions"]["rm/base"]["arms"] == ["apo", "fixed"]
    for version in stored:
        folder = run / "models" / version
        names = {p.name for p in folder.iterdir()}
        assert {"model.safetensors", "config.json", "tokenizer.json", "chat_template.jinja", "README.md",
                "apo_export.json"} <= names, (version, names)
        assert ("generation_config.json" in names) == version.startswith("policy/")
        # the folder follows the umask like every other output (not mkdtemp's 0700): others can read it
        umask = os.umask(0)
        os.umask(umask)
        assert folder.stat().st_mode & 0o777 == 0o777 & ~umask, (version, oct(folder.stat().st_mode))


def test_exported_rms_give_our_scores_with_plain_transformers(sweep):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    from apo_ray.models.loading import encode_prompt_response, format_prompt
    from apo_ray.models.scoring import RewardScorer

    run = sweep["run"]
    cfg = _cfg(run)
    prompts, answers = _texts(run)
    answers[0] = ""  # an empty answer: the score is read at its end-of-turn token too
    scorer = RewardScorer(cfg.model.reward, max_length=cfg.rm.max_length, score_batch=4, dtype="float32")
    for version in ("rm/base", "rm/eval", "rm/apo/r1"):
        scorer.load_weights(load_checkpoint(_store(run).version_path(version)))
        ours = torch.tensor(scorer.score(prompts, answers))
        folder = run / "models" / version
        rm = AutoModelForSequenceClassification.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        assert rm.config.num_labels == 1 and tokenizer.pad_token_id == rm.config.pad_token_id != tokenizer.eos_token_id
        # the same token ids our scorer builds, batched and padded by the exported tokenizer
        ids = [encode_prompt_response(tokenizer, format_prompt(tokenizer, p), a, cfg.rm.max_length).input_ids
               for p, a in zip(prompts, answers)]
        for side in ("right", "left"):
            tokenizer.padding_side = side
            batch = tokenizer.pad({"input_ids": ids}, return_tensors="pt")
            with torch.no_grad():
                theirs = rm(**batch).logits[:, 0].float()
            torch.testing.assert_close(theirs, ours, rtol=1.6e-2, atol=1e-2)  # bf16 tolerance
        assert ours.std() > 0  # the comparison is over distinct scores


def test_exported_policies_reproduce_our_logits(sweep):
    from transformers import AutoModelForCausalLM, AutoTokenizer, GenerationConfig

    from apo_ray.models.loading import load_policy

    run = sweep["run"]
    cfg = _cfg(run)
    _, answers = _texts(run)
    base = load_policy(cfg.model.policy)
    for version in ("policy/fixed/r1", "policy/apo/r1"):
        state = load_checkpoint(_store(run).version_path(version))
        ours_model = load_policy(cfg.model.policy)
        ours_model.load_state_dict(state)
        folder = run / "models" / version
        theirs_model = AutoModelForCausalLM.from_pretrained(folder)
        tokenizer = AutoTokenizer.from_pretrained(folder)
        text = tokenizer.apply_chat_template([{"role": "user", "content": "How do I bake bread?"}], tokenize=False,
                                             add_generation_prompt=True) + answers[1]
        ids = tokenizer(text, add_special_tokens=False, return_tensors="pt").input_ids
        with torch.no_grad():
            ours, theirs, start = ours_model(ids).logits, theirs_model(ids).logits.float(), base(ids).logits
        torch.testing.assert_close(theirs, ours, rtol=1.6e-2, atol=1e-2)
        assert (ours - start).abs().max() > 1e-3  # the trained weights, not the base model's
        generation = GenerationConfig.from_pretrained(folder)
        assert generation.max_new_tokens == cfg.generation.testing.max_new_tokens
        # the paper's test decoding, every preset's default since issue 21
        assert generation.top_k == cfg.generation.testing.top_k == 5 and generation.temperature == 0.3
        assert generation.do_sample and generation.eos_token_id == tokenizer.eos_token_id


def test_export_job_writes_folders_for_a_stopped_run(sweep, tmp_path, capsys):
    import shutil

    import export as export_job  # jobs/export.py

    run = tmp_path / "stopped"
    shutil.copytree(sweep["run"] / "phases", run / "phases")
    shutil.copy(sweep["run"] / "resolved_config.json", run)  # no summary.json: the run never finished
    done = export_job.main([str(run), "--versions", "rm/*"])
    assert sorted(done) == ["rm/apo/r1", "rm/base", "rm/eval"]
    assert (run / "models" / "rm" / "apo" / "r1" / "model.safetensors").exists()
    assert not (run / "models" / "policy").exists()
    assert re.search(r"export: 100%\|.*\| 3/3", capsys.readouterr().err)  # the progress bar
    with pytest.raises(SystemExit, match="resolved_config.json not found"):
        export_job.main([str(tmp_path / "nothing")])


@pytest.mark.slow
def test_vllm_loads_an_exported_policy_folder(smollm2_model, tmp_path):
    """vLLM's CPU attention has no kernel for the tiny model's head size (16), so the real SmolLM2
    is exported (with its top block changed) and served by a real vLLM engine from the folder."""
    pytest.importorskip("vllm")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from apo_ray.models.loading import load_policy
    from apo_ray.outputs.export import export_version, generation_config_values

    model = load_policy("smollm2-135m-instruct")
    torch.manual_seed(0)
    with torch.no_grad():
        model.model.layers[-1].mlp.down_proj.weight.mul_(1.5)
    decoding = type("Decoding", (), {"max_new_tokens": 7, "temperature": 0.7, "top_p": 0.9})()
    folder = export_version("policy/apo/r1", model.state_dict(), tmp_path / "policy", base_model="smollm2-135m-instruct",
                            generation=generation_config_values(decoding))
    tokenizer = AutoTokenizer.from_pretrained(folder)
    prompt_ids = list(tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France?"}],
                                                    add_generation_prompt=True, tokenize=True, return_dict=False))
    script = tmp_path / "serve_folder.py"
    script.write_text(VLLM_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(folder), json.dumps(prompt_ids)], capture_output=True,
                          text=True, timeout=900, check=False)
    result = re.search(r"^RESULT (.*)$", proc.stdout, re.MULTILINE)
    assert result, proc.stdout[-3000:] + proc.stderr[-5000:]
    got = json.loads(result.group(1))
    # vLLM took its default sampling parameters from the folder's generation_config.json
    assert (got["max_tokens"], got["temperature"], got["top_p"]) == (7, 0.7, 0.9)
    exported = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    greedy = exported.generate(torch.tensor([prompt_ids]), max_new_tokens=6, do_sample=False)[0, len(prompt_ids):]
    assert got["tokens"][:4] == greedy.tolist()[:4]


VLLM_SCRIPT = """
import json, sys
if __name__ == "__main__":  # vLLM spawns its engine process
    from vllm import LLM, SamplingParams
    llm = LLM(model=sys.argv[1], dtype="float32", enforce_eager=True, max_model_len=256,
              kv_cache_memory_bytes=256 << 20, seed=0)
    d = llm.get_default_sampling_params()
    out = llm.generate([{"prompt_token_ids": json.loads(sys.argv[2])}], SamplingParams(temperature=0, max_tokens=6))
    print("RESULT " + json.dumps({"max_tokens": d.max_tokens, "temperature": d.temperature, "top_p": d.top_p,
                                  "tokens": list(out[0].outputs[0].token_ids)}), flush=True)
"""


def test_greedy_and_sampling_decoding_give_generation_configs_transformers_saves(tmp_path):
    """Greedy test answers (temperature 0) clear every sampling field, the base model's included
    (transformers refuses to save a greedy config with top_k set); sampling keeps them, top_k=0 too."""
    from transformers import GenerationConfig

    from apo_ray.config import DecodingConfig
    from apo_ray.outputs.export import generation_config_values

    saved = {}
    for name, decoding in (("greedy", DecodingConfig(temperature=0.0, max_new_tokens=9)),
                           ("sampling", DecodingConfig(temperature=0.3, top_k=0, top_p=0.85))):
        base = GenerationConfig(do_sample=True, temperature=0.2, top_p=0.9)  # as SmolLM2's own
        base.update(**generation_config_values(decoding, stop=["\nHuman"]))
        base.save_pretrained(tmp_path / name)
        saved[name] = GenerationConfig.from_pretrained(tmp_path / name).to_diff_dict()
    assert saved["greedy"]["do_sample"] is False and saved["greedy"]["max_new_tokens"] == 9
    assert not {"temperature", "top_p", "top_k"} & set(saved["greedy"])
    assert (saved["sampling"]["temperature"], saved["sampling"]["top_p"], saved["sampling"]["top_k"]) == (0.3, 0.85, 0)
    assert saved["greedy"]["stop_strings"] == ["\nHuman"]


def test_save_models_selects_versions_from_the_records():
    from apo_ray.outputs.export import select_versions

    records = [{"round": 0, "rm_mode": "fixed", "policy": "policy/init", "rm": "rm/base", "eval_rm": "rm/eval"},
               {"round": 1, "rm_mode": "fixed", "policy": "policy/fixed/r1", "rm": "rm/base", "eval_rm": "rm/eval"},
               {"round": 1, "rm_mode": "apo", "policy": "policy/apo/r1", "rm": "rm/apo/r1", "eval_rm": "rm/eval"},
               {"round": 1, "rm_mode": "apo_seq", "policy": "policy/apo/r1", "rm": "rm/apo/r1", "eval_rm": "rm/eval"},
               {"round": 2, "rm_mode": "apo", "policy": "policy/apo/r2", "rm": "rm/apo/r2", "eval_rm": "rm/eval"}]
    every = dict(select_versions(records, "all", last_round=2))
    assert sorted(every) == ["policy/apo/r1", "policy/apo/r2", "policy/fixed/r1", "rm/apo/r1", "rm/apo/r2",
                             "rm/base", "rm/eval"]  # never the starting checkpoints
    assert every["policy/apo/r1"]["arms"] == ["apo", "apo_seq"] and every["rm/eval"]["role"] == "eval_rm"
    assert sorted(dict(select_versions(records, "last", last_round=2))) == ["policy/apo/r2", "rm/apo/r2", "rm/eval"]
    assert select_versions(records, "none", last_round=2) == []


def test_rm_pad_token_never_ends_a_scored_text(tiny_tokenizer):
    from apo_ray.outputs.export import rm_pad_token

    assert tiny_tokenizer.pad_token_id == tiny_tokenizer.eos_token_id  # SmolLM2: why the export needs this
    token, token_id = rm_pad_token(tiny_tokenizer)
    assert token_id != tiny_tokenizer.eos_token_id and tiny_tokenizer.convert_tokens_to_ids(token) == token_id


# -- trackers ----------------------------------------------------------------------------------------


def _summary(run: Path) -> dict:
    return {(r["round"], r["rm_mode"]): r for r in json.loads((run / "summary.json").read_text())}


@ALL_TRACKERS
def test_tensorboard_event_files_hold_the_scalars(sweep):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = sweep["run"]
    events = EventAccumulator(str(run / "tracking" / "tensorboard"), size_guidance={"scalars": 0, "tensors": 0})
    events.Reload()
    scalars = set(events.Tags()["scalars"])

    def values(tag):
        return {e.step: e.value for e in events.Scalars(tag)}

    base = _store(run).get("rm/base")
    assert values("learner/rm/base/loss") == pytest.approx(dict(enumerate(base["losses"], start=1)))
    lrs = values("learner/rm/base/lr")
    assert sorted(lrs) == sorted(values("learner/rm/base/loss"))
    assert all(lr == pytest.approx(_cfg(run).rm.base_lr) for lr in lrs.values())
    assert "learner/policy/apo/r1/loss" in scalars
    record = _summary(run)[(1, "apo")]
    assert values("rm/apo/test_acc")[1] == pytest.approx(record["rm_test_acc"])
    assert values("rm/apo/test_ece")[1] == pytest.approx(record["rm_test_ece"])
    assert values("policy/apo/mean_reward")[1] == pytest.approx(record["policy_mean_reward"])
    assert {"phase/train_policy/seconds", "phase/sample_queries/samples_per_s", "phase/train_rm/examples_per_s",
            "run/progress_pct"} <= scalars
    assert max(values("run/progress_pct").values()) == pytest.approx(100.0)
    assert {"config", "answers/round_1/apo"} <= {t.split("/text_summary")[0] for t in events.Tags()["tensors"]}


@ALL_TRACKERS
def test_mlflow_store_holds_the_run(sweep):
    from mlflow.tracking import MlflowClient

    for point, beta2 in enumerate(BETA2):
        run = sweep["root"] / str(point)
        client = MlflowClient(f"sqlite:///{run / 'tracking' / 'mlflow.db'}")
        experiment = client.get_experiment_by_name("smoke")
        (found,) = client.search_runs([experiment.experiment_id])
        assert found.info.status == "FINISHED"
        assert float(found.data.params["apo.beta2"]) == beta2
        record = _summary(run)[(1, "apo")]
        assert found.data.metrics["rm/apo/test_acc"] == pytest.approx(record["rm_test_acc"])
        history = client.get_metric_history(found.info.run_id, "learner/rm/apo/r1/loss")
        assert [m.value for m in history] == pytest.approx(_store(run).get("rm/apo/r1")["losses"])
        artifacts = {a.path for a in client.list_artifacts(found.info.run_id)}
        assert {"resolved_config.json", "report.md", "summary.json", "answers"} <= artifacts
        table = client.list_artifacts(found.info.run_id, "answers/round_1")
        assert {a.path for a in table} == {"answers/round_1/apo.json", "answers/round_1/fixed.json"}


def read_wandb_history(path: Path) -> dict[str, list]:
    """Every history value of an offline W&B run file (a LevelDB-style log of protobuf records:
    32 KiB blocks, 7-byte record headers: crc32, length, type)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, block, chunk, history = path.read_bytes(), 7, 32768, b"", {}
    while pos + 7 <= len(data):
        left = block - pos % block
        if left < 7:
            pos += left
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0 and length == 0:  # zero padding to the end of the block
            pos += left
            continue
        chunk += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # a full record, or the last piece of one
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunk)
            chunk = b""
            if record.WhichOneof("record_type") == "history":
                for item in record.history.item:
                    history.setdefault(item.key or "/".join(item.nested_key), []).append(json.loads(item.value_json))
    return history


@ALL_TRACKERS
def test_wandb_offline_run_holds_the_history(sweep):
    run = sweep["run"]
    (run_file,) = (run / "tracking" / "wandb").glob("offline-run-*/run-*.wandb")
    history = read_wandb_history(run_file)
    record = _summary(run)[(1, "apo")]
    assert record["rm_test_acc"] in history["rm/apo/test_acc"]
    assert history["learner/rm/base/loss"] == pytest.approx(_store(run).get("rm/base")["losses"])
    # the table of sample answers: logged as a W&B table file of 8 rows x 5 columns
    assert history["answers/round_1/apo/_type"] == ["table-file"]
    assert (history["answers/round_1/apo/nrows"], history["answers/round_1/apo/ncols"]) == ([8], [5])


def test_a_missing_tracker_package_names_the_extra(tiny_cfg_factory, tmp_path, monkeypatch):
    from apo_ray.outputs.tracking import TrackerUnavailable
    from apo_ray.runtime.launch import run_in_process

    monkeypatch.setitem(sys.modules, "mlflow", None)  # import mlflow now raises ImportError
    cfg = tiny_cfg_factory(run__tracking=["mlflow"], run__output_dir=str(tmp_path))
    with pytest.raises(TrackerUnavailable, match=re.escape("pip install 'apo-ray[mlflow]'")):
        run_in_process(cfg)
    assert not (tmp_path / "phases").exists()  # refused before any work


def test_unknown_tracker_and_save_models_are_refused(tiny_cfg_factory):
    from apo_ray.config import ConfigError

    with pytest.raises(ConfigError, match="run.tracking: unknown tracker 'tensorbored'"):
        tiny_cfg_factory(run__tracking=["tensorbored"])
    with pytest.raises(ConfigError, match="run.save_models must be one of"):
        tiny_cfg_factory(run__save_models="some")


# -- progress ----------------------------------------------------------------------------------------


def test_one_progress_line_per_phase_with_rate_and_eta(sweep, tmp_path):
    from apo_ray.game.game_data import build_game_data
    from apo_ray.game.plan import plan_phases

    lines = [line for line in sweep["log"].splitlines() if "apo_ray.outputs.progress" in line and "] " in line]
    cfg = _cfg(sweep["run"])
    cfg.eval.shared_rm_dir = str(tmp_path / "none_yet")  # point 0's plan: no shared evaluation RM existed
    planned = len(plan_phases(cfg, build_game_data(cfg)))
    cfg.eval.shared_rm_dir = str(sweep["root"] / "eval_rms")  # now it does: one phase fewer to plan
    assert len(plan_phases(cfg, build_game_data(cfg))) == planned - 1
    # point 0's lines by their count of planned phases (point 1 plans one fewer: it reuses the shared
    # evaluation RM); stdout and stderr are joined, so the two points' lines are not in order
    point0 = [line for line in lines if re.search(rf"\[\d+/{planned}\]", line)]
    assert point0 and len(point0) <= planned
    assert re.search(rf"\[{planned}/{planned}\] round 1 arm apo: evaluated .* run 100% done", point0[-1])
    train = next(line for line in point0 if ": train_rm " in line)
    assert re.search(r"train_rm [\d.]+s \(48 examples, [\d.]+ examples/s\) \| run \d+% done, elapsed \S+, ETA \S+", train)
    assert re.search(r"sample_queries [\d.]+s \(24 samples, [\d.]+ samples/s\)", "\n".join(point0))


def test_plan_counts_shared_phases_once(tiny_cfg_factory, hh_data_path):
    from apo_ray.game.game_data import build_game_data
    from apo_ray.game.plan import plan_phases

    one = tiny_cfg_factory(apo__arms=["apo"])
    two = tiny_cfg_factory(apo__arms=["apo", "apo_seq"])
    data = build_game_data(one)
    plan_one, plan_two = plan_phases(one, data), plan_phases(two, data)
    assert len({p["key"] for p in plan_two}) == len(plan_two)  # every phase once
    # apo_seq shares all of round 1 with apo; in round 2 it trains its own RM and policy
    assert {p["key"] for p in plan_two} - {p["key"] for p in plan_one} >= {"rm/apo_seq/r2", "policy/apo_seq/r2"}
    assert not any(p["key"].endswith("apo_seq/r1") for p in plan_two)


def test_run_progress_eta_weights_phases_by_their_own_mean():
    from apo_ray.game.events import PhaseFinished
    from apo_ray.outputs.progress import RunProgress

    now = [0.0]
    plan = [{"phase": "train", "key": "a"}, {"phase": "score", "key": "b"}, {"phase": "train", "key": "c"},
            {"phase": "score", "key": "d"}]
    progress = RunProgress(plan, done_keys={"a"}, clock=lambda: now[0])
    assert (progress.done, progress.total) == (1, 4)
    now[0] = 12.0
    line = progress.on_phase(PhaseFinished("score", "b", 2.0, round=1, arm="apo"), 8, "scores/s")
    assert line.startswith("[2/4] round 1 arm apo: score 2.0s (8 scores, 4.0 scores/s)")
    assert progress.eta_seconds() == pytest.approx(4.0)  # c: no train seen yet -> overall mean 2; d: 2
    progress.on_phase(PhaseFinished("train", "c", 30.0))
    assert progress.eta_seconds() == pytest.approx(2.0)  # d: the mean of score phases
    assert "ETA 2s" in progress.on_phase(PhaseFinished("train", "x", 1.0))


def test_chat_api_map_shows_a_progress_bar(capsys):
    from apo_ray.llm_api.judge import ChatAPI

    api = ChatAPI("http://127.0.0.1:9/v1", "none", concurrency=2)
    assert api.map(lambda x: x * x, [1, 2, 3], desc="judge", unit="answer") == [1, 4, 9]
    err = capsys.readouterr().err
    assert re.search(r"judge: 100%\|.*\| 3/3 \[.*answer/s\]", err), err
    assert api.map(lambda x: x, [1]) == [1] and capsys.readouterr().err == ""  # no desc, no bar


# -- sweeps ------------------------------------------------------------------------------------------


def test_multirun_writes_the_sweep_report(sweep):
    root = sweep["root"]
    report = (root / "sweep_report.md").read_text()
    assert "swept: `apo.beta2`" in report
    rows = [line for line in report.splitlines() if line.startswith(("| 1.0 |", "| 10.0 |"))]
    assert len(rows) == 2 * 4  # per point: rounds 0 and 1 of two arms
    csv_rows = (root / "sweep_summary.csv").read_text().splitlines()
    assert csv_rows[0].startswith("apo.beta2,arm,round,rm_test_acc,rm_test_ece")
    for point, beta2 in enumerate(BETA2):
        record = _summary(root / str(point))[(1, "apo")]
        assert f"{beta2},apo,1,{record['rm_test_acc']},{record['rm_test_ece']}" in "\n".join(csv_rows)
    assert (root / "sweep_apo_beta2.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "![apo.beta2](sweep_apo_beta2.png)" in report


def test_sweep_report_job_names_a_folder_without_runs(tmp_path):
    import sweep_report

    with pytest.raises(SystemExit, match="no finished run"):
        sweep_report.main([str(tmp_path)])


def test_sweep_quotes_the_job_command():
    import sweep

    fixed = ["data.path=hf://Anthropic/hh-rlhf?data_dir=harmless-base&split=test", "run.name=my run", "x='q'"]
    command = sweep.entrypoint(fixed, ["apo.beta2=1"], Path("/shared/sweep one/apo.beta2_1"))
    assert shlex.split(command) == ["python", "jobs/apo.py", *fixed, "apo.beta2=1",
                                    "run.output_dir=/shared/sweep one/apo.beta2_1"]


def test_sweep_grid_follows_hydra_sweep_syntax():
    import sweep

    points = sweep.grid(["apo.beta2=1,10", "policy.lrs=[1e-5,1e-6],[2e-5]", "rm.epochs=range(1,3)"])
    assert len(points) == 8
    assert points[0] == ["apo.beta2=1", "policy.lrs=[1e-05,1e-06]", "rm.epochs=1"]
    assert {p[1] for p in points} == {"policy.lrs=[1e-05,1e-06]", "policy.lrs=[2e-05]"}
    with pytest.raises(SystemExit, match="sweep:"):
        sweep.grid(["apo.beta2=1,,"])
