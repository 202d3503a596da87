"""LoRA learners and adapter-only exchange (apo_ray/models/lora.py): the learners against a plain
single-process peft loop, DDP and ZeRO-2 against one process, the receivers (transformers
generator, scorer) against transformers + peft, the merged export, and the config checks.

All on the tiny random Llama on CPU with real HH-RLHF pairs.
"""

from __future__ import annotations

import dataclasses

import pytest
import torch

from apo_ray.config import ConfigError, LoraConfig, validate
from apo_ray.core.losses import apo_rm_loss, masked_lm_loss
from apo_ray.data import RankedPair
from apo_ray.models import lora
from apo_ray.models.generation import HFGenerator
from apo_ray.models.loading import (
    encode_prompt_response,
    format_prompt,
    load_policy,
    load_reward_model,
    load_tokenizer,
    pad_batch,
    reward_forward,
)
from apo_ray.models.scoring import RewardScorer
from apo_ray.models.training import PolicyLoss, TrainSettings, _steps, train_policy, train_reward_model

TINY = "tiny-random-llama"
LORA = LoraConfig(rank=4, alpha=8.0, dropout=0.0, target_modules=["q_proj", "v_proj", "up_proj"])


def settings(**kw) -> TrainSettings:
    base = {"lr": 1e-2, "examples_per_step": 4, "micro_examples": 4, "max_length": 64, "epochs": 2,
            "precision": "fp32", "seed": 3, "max_grad_norm": None, "lora": LORA}
    return TrainSettings(**(base | kw))


@pytest.fixture(scope="module")
def pref_pairs(hh_pairs) -> list[RankedPair]:
    return [RankedPair(p.prompt, p.chosen, p.rejected, "pref") for p in hh_pairs[:8]]


@pytest.fixture(scope="module")
def sft_examples(hh_pairs) -> list[tuple[str, str]]:
    return [(p.prompt, p.chosen) for p in hh_pairs[20:28]]


def peft_reference(load, role: str, s: TrainSettings, n_items: int, step_loss):
    """A plain peft training loop: seeded load, ``get_peft_model`` (the RM's head in
    ``modules_to_save``), torch AdamW over what peft left trainable, one batch per step."""
    from peft import LoraConfig as PeftLoraConfig
    from peft import get_peft_model
    from peft.utils import get_peft_model_state_dict

    torch.manual_seed(s.seed)
    model = load(TINY)
    config = PeftLoraConfig(r=LORA.rank, lora_alpha=LORA.alpha, lora_dropout=0.0, target_modules=LORA.target_modules,
                            modules_to_save=["score"] if role == "rm" else None)
    peft_model = get_peft_model(model, config)
    opt = torch.optim.AdamW([p for p in peft_model.parameters() if p.requires_grad], lr=s.lr, weight_decay=0.0)
    peft_model.train()
    losses = []
    for step in _steps(n_items, s.examples_per_step, s.seed, s.epochs):
        opt.zero_grad()
        loss = step_loss(peft_model, step)
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses, {k: v.detach().clone() for k, v in get_peft_model_state_dict(peft_model).items()}


def assert_same_adapter(state: dict, reference: dict, atol: float = 1e-6) -> None:
    assert lora.is_adapter(state)
    tensors = lora.tensors_of(state)
    assert tensors.keys() == reference.keys()
    for k, expected in reference.items():
        assert torch.allclose(tensors[k].float(), expected.float(), atol=atol, rtol=1e-4), k


def test_lora_rm_learner_matches_a_peft_reference(tiny_model, pref_pairs):
    s = settings()
    state, stats = train_reward_model(TINY, None, pref_pairs, s)
    tok = load_tokenizer(TINY, padding_side="right")

    def step_loss(peft_model, step):
        enc = [encode_prompt_response(tok, format_prompt(tok, pref_pairs[i].prompt), pref_pairs[i].good, 64)
               for i in step] + \
              [encode_prompt_response(tok, format_prompt(tok, pref_pairs[i].prompt), pref_pairs[i].bad, 64)
               for i in step]
        batch = pad_batch(enc, tok.pad_token_id, side="right")
        r = reward_forward(peft_model.base_model.model, batch["input_ids"], batch["attention_mask"])
        empty = r[:0]
        return apo_rm_loss(empty, empty, r[:len(step)], r[len(step):], beta2=1.0, apo_weight=0.0,
                           n_apo=0, n_pref=len(step))

    losses, reference = peft_reference(load_reward_model, "rm", s, len(pref_pairs), step_loss)
    assert stats["losses"] == pytest.approx(losses, abs=1e-5)
    assert losses[-1] < losses[0]
    assert_same_adapter(state, reference)
    assert "base_model.model.score.weight" in state  # the head, trained in full, travels with the adapter
    assert stats["lora"]["base_model"] == TINY and lora.read_spec(state).base_model == TINY
    # only the adapter travels: a small fraction of the model
    full = sum(v.numel() for v in load_reward_model(TINY).state_dict().values())
    assert sum(v.numel() for v in lora.tensors_of(state).values()) < full / 10


def test_lora_policy_learner_matches_a_peft_reference_and_continues_from_its_adapter(tiny_model, sft_examples):
    s = settings(epochs=1)
    tok = load_tokenizer(TINY, padding_side="right")

    def step_loss(peft_model, step):
        enc = [encode_prompt_response(tok, format_prompt(tok, sft_examples[i][0]), sft_examples[i][1], 64)
               for i in step]
        batch = pad_batch(enc, tok.pad_token_id)
        logits = peft_model(input_ids=batch["input_ids"]).logits
        return masked_lm_loss(logits, batch["input_ids"], batch["loss_mask"], n_tokens=int(batch["loss_mask"].sum()))

    state, stats = train_policy(TINY, None, sft_examples, s, loss=PolicyLoss("rjs"))
    losses, reference = peft_reference(load_policy, "policy", s, len(sft_examples), step_loss)
    assert stats["losses"] == pytest.approx(losses, abs=1e-5)
    assert_same_adapter(state, reference)
    # A second phase starts from the first one's adapter: its first loss is the reference's loss
    # under those weights, not the base model's.
    _, again = train_policy(TINY, state, sft_examples, dataclasses.replace(s, lr=0.0), loss=PolicyLoss("rjs"))
    assert again["losses"][0] != pytest.approx(losses[0], abs=1e-4)
    with pytest.raises(ValueError, match="full state dict"):
        train_policy(TINY, load_policy(TINY).state_dict(), sft_examples, s)


def test_lora_with_trainable_layers_adapts_the_top_blocks_only(tiny_model, pref_pairs):
    state, _ = train_reward_model(TINY, None, pref_pairs, settings(trainable_layers=1, epochs=1))
    spec = lora.read_spec(state)
    assert spec.layers == (1,)  # the tiny model has 2 blocks
    names = [k for k in state if "lora_A" in k]
    assert names and all(".layers.1." in k for k in names)


def test_lora_gradient_checkpointing_gives_the_same_adapter(tiny_model, sft_examples):
    s = settings(epochs=1, micro_examples=2)
    plain, a = train_policy(TINY, None, sft_examples, s)
    checkpointed, b = train_policy(TINY, None, sft_examples, dataclasses.replace(s, gradient_checkpointing=True))
    assert a["losses"] == pytest.approx(b["losses"], abs=1e-5)
    assert_same_adapter(checkpointed, lora.tensors_of(plain), atol=1e-5)


def test_lora_refuses_sharded_strategies(tiny_model, pref_pairs):
    for kw in ({"strategy": "fsdp"}, {"strategy": "deepspeed", "zero_stage": 3}):
        with pytest.raises(ValueError, match="rm.lora"):
            train_reward_model(TINY, None, pref_pairs, settings(**kw))


def test_lora_config_checks(tiny_cfg):
    cfg = dataclasses.replace(tiny_cfg)
    cfg.policy.lora = LoraConfig(rank=-1)
    with pytest.raises(ConfigError, match=r"policy\.lora\.rank"):
        validate(cfg)
    cfg.policy.lora = LoraConfig(rank=8, target_modules=[])
    with pytest.raises(ConfigError, match=r"policy\.lora\.target_modules"):
        validate(cfg)
    cfg.policy.lora = LoraConfig(rank=8)
    cfg.cluster.learner_strategy = "fsdp"
    with pytest.raises(ConfigError, match=r"policy\.lora\.rank=8 works with cluster\.learner_strategy"):
        validate(cfg)
    cfg.cluster.learner_strategy = "ddp"
    assert validate(cfg) is cfg


# ------------------------------------------------------------------------------ receivers


@pytest.fixture(scope="module")
def policy_adapter(tiny_model) -> dict:
    """A policy adapter that visibly changes the model (lora_B starts at zero: drawn here)."""
    return _random_adapter(load_policy(TINY), "policy")


def _random_adapter(model, role: str, scale: float = 0.5) -> dict:
    spec = lora.spec_for(model, TINY, role, LORA, None)
    peft_model = lora.apply_lora(model, spec)
    gen = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for p in lora.adapter_parameters(peft_model).values():
            p.add_(scale * torch.randn(p.shape, generator=gen))
    return lora.adapter_state(peft_model, spec)


def test_hf_generator_serves_adapters_like_transformers_with_peft(tiny_model, policy_adapter, hh_pairs, tmp_path):
    from apo_ray.config import DecodingConfig

    greedy = DecodingConfig(max_new_tokens=8, temperature=0.0)
    prompts = [p.prompt for p in hh_pairs[:4]]
    gen = HFGenerator(TINY, decoding=greedy, max_prompt_tokens=48, device="cpu")
    base = gen.generate(prompts, 1)
    gen.load_weights(policy_adapter)
    adapted = gen.generate(prompts, 1)
    assert adapted != base

    # transformers + peft from the adapter folder: the same greedy answers
    from peft import PeftModel

    folder = lora.write_peft_folder(policy_adapter, tmp_path / "adapter")
    ref = HFGenerator(TINY, decoding=greedy, max_prompt_tokens=48, device="cpu")
    ref.model = PeftModel.from_pretrained(ref.model, str(folder)).eval()
    assert ref.generate(prompts, 1) == adapted

    # merged into plain weights, loadable by transformers without peft: the same answers again
    merged = lora.merged_state_dict(policy_adapter)
    plain = HFGenerator(TINY, decoding=greedy, max_prompt_tokens=48, device="cpu")
    plain.load_weights(merged)
    assert plain.generate(prompts, 1) == adapted

    gen.load_pretrained()  # the base policy again, without reloading anything
    assert gen.generate(prompts, 1) == base
    assert gen.adapter.peft is not None


def test_scorer_serves_rm_adapters_with_their_head(tiny_model, hh_pairs):
    torch.manual_seed(0)
    adapter = _random_adapter(load_reward_model(TINY), "rm", scale=0.2)
    prompts, responses = [p.prompt for p in hh_pairs[:4]], [p.chosen for p in hh_pairs[:4]]
    scorer = RewardScorer(TINY, max_length=64, device="cpu")
    scorer.load_weights(adapter)
    scores = scorer.score(prompts, responses)
    merged = RewardScorer(TINY, max_length=64, device="cpu")
    merged.load_weights(lora.merged_state_dict(adapter))
    assert merged.score(prompts, responses) == pytest.approx(scores, abs=1e-4)
    scorer.load_pretrained()
    assert scorer.score(prompts, responses) != pytest.approx(scores, abs=1e-3)


# ------------------------------------------------------------------------------ vLLM serving adapters


@pytest.mark.slow
def test_vllm_serves_each_version_as_an_adapter_like_transformers_with_peft(tiny_model, hh_pairs):
    """One engine, three versions (two adapters, then the base): the greedy answers of transformers
    with each adapter applied, no full weight reload, and no adapter folder left behind."""
    pytest.importorskip("vllm")
    from apo_ray.config import DecodingConfig
    from apo_ray.models.vllm_generator import LORA_PREFIX, VLLMGenerator, _shm_dir
    from apo_ray.models.weights import pack_state_dict

    greedy = DecodingConfig(max_new_tokens=8, temperature=0.0)
    prompts = [hh_pairs[i].prompt for i in (0, 3, 7, 11)]
    first = _random_adapter(load_policy(TINY), "policy", scale=0.3)
    second = {k: (-v if "lora_B" in k else v) for k, v in first.items()}  # B -> -B: the opposite update
    hf = HFGenerator(TINY, decoding=greedy, max_prompt_tokens=48, prompts_per_batch=1, device="cpu")
    expected = {"base": hf.generate(prompts, 1)}
    for name, adapter in (("first", first), ("second", second)):
        hf.load_weights(adapter)
        expected[name] = hf.generate(prompts, 1)
    assert len({str(v) for v in expected.values()}) == 3  # three different policies

    gen = VLLMGenerator(TINY, decoding=greedy, max_prompt_tokens=48, dtype="float32", max_model_len=64,
                        engine_kwargs={"kv_cache_memory_bytes": 64 << 20}, lora_rank=LORA.rank)
    try:
        assert gen.generate(prompts, 1) == expected["base"]
        gen.load_weights(first)
        assert gen.last_reload["bytes"] < 200_000  # the adapter only, not the model
        assert gen.generate(prompts, 1) == expected["first"]
        gen.load_packed(pack_state_dict(second))  # as it arrives from the object store
        assert gen.generate(prompts, 1) == expected["second"]
        assert len(list(_shm_dir().glob(f"{LORA_PREFIX}{__import__('os').getpid()}-*"))) == 1
        gen.load_pretrained()
        assert gen.generate(prompts, 1) == expected["base"]
        assert set(gen.llm.llm_engine.list_loras()) == {2}  # the first adapter left the engine
    finally:
        gen.close()
    assert not list(_shm_dir().glob(f"{LORA_PREFIX}{__import__('os').getpid()}-*"))


def test_export_writes_the_peft_adapter_and_on_request_a_merged_model(tiny_model, policy_adapter, tmp_path):
    """The exported adapter loads with peft on the base model, the merged model with plain
    transformers, and both give the same logits (those of the adapter, not the base model's)."""
    import json

    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from apo_ray.models.loading import resolve_model
    from apo_ray.outputs.export import EXPORT_META, export_version

    folder = export_version("policy/apo/r1", policy_adapter, tmp_path / "r1", base_model=TINY, merged=True)
    info = json.loads((folder / EXPORT_META).read_text())
    assert info["format"] == "peft LoRA adapter" and info["base_model"] == TINY and info["lora_rank"] == LORA.rank
    assert (folder / "adapter_model.safetensors").stat().st_size < 200_000
    ids = torch.tensor([[1, 5, 9, 200, 31, 7]])
    base = AutoModelForCausalLM.from_pretrained(resolve_model(TINY), dtype=torch.float32)
    with torch.no_grad():
        base_logits = base(input_ids=ids).logits
        with_adapter = PeftModel.from_pretrained(base, str(folder)).eval()(input_ids=ids).logits
        merged = AutoModelForCausalLM.from_pretrained(folder / "merged", dtype=torch.float32)(input_ids=ids).logits
    assert not torch.allclose(with_adapter, base_logits, atol=1e-3)
    assert torch.allclose(merged, with_adapter, atol=2e-2)  # merged is saved in the base checkpoint's dtype
    plain = export_version("policy/apo/r1", policy_adapter, tmp_path / "plain", base_model=TINY)
    assert not (plain / "merged").exists()


# ------------------------------------------------------------------------------ DDP and ZeRO-2

RANKS_SCRIPT = """
import os, sys
import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def run(rank, data, port, out):
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=port, RANK=str(rank), WORLD_SIZE="2", LOCAL_RANK=str(rank))
    torch.set_num_threads(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from apo_ray.config import LoraConfig
    from apo_ray.data import RankedPair, load_preference_pairs
    from apo_ray.models.training import TrainSettings, train_reward_model

    pairs = [RankedPair.from_preference(p) for p in load_preference_pairs(data, limit=8)]
    lora = LoraConfig(rank=4, alpha=8.0, target_modules=["q_proj", "v_proj", "up_proj"])
    results = {}
    for name, kw in (("ddp", {"strategy": "ddp"}), ("zero2", {"strategy": "deepspeed", "zero_stage": 2})):
        s = TrainSettings(lr=1e-2, examples_per_step=4, micro_examples=2, max_length=64, epochs=1, precision="fp32",
                          seed=3, max_grad_norm=None, lora=lora, rank=rank, world_size=2, **kw)
        prepare = torch.nn.parallel.DistributedDataParallel if name == "ddp" else (lambda m: m)
        results[name] = train_reward_model("tiny-random-llama", None, pairs, s, prepare_model=prepare)
    if rank == 0:
        torch.save(results, out)
    dist.destroy_process_group()


if __name__ == "__main__":
    mp.spawn(run, args=tuple(sys.argv[1:]), nprocs=2)
"""


@pytest.mark.slow
def test_lora_rm_learner_under_ddp_and_zero2_matches_one_process(tiny_model, hh_data_path, tmp_path):
    """Two gloo ranks under DDP and under DeepSpeed ZeRO-2: the same losses and adapter (+ head) as one
    process on the same steps."""
    pytest.importorskip("deepspeed")
    import socket
    import subprocess
    import sys

    from apo_ray.data import load_preference_pairs

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = str(sock.getsockname()[1])
    script, out = tmp_path / "ranks.py", tmp_path / "results.pt"
    script.write_text(RANKS_SCRIPT)
    proc = subprocess.run([sys.executable, str(script), str(hh_data_path), port, str(out)], capture_output=True,
                          text=True, timeout=900, check=False)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    results = torch.load(out, weights_only=False)
    pairs = [RankedPair.from_preference(p) for p in load_preference_pairs(hh_data_path, limit=8)]
    one, stats = train_reward_model(TINY, None, pairs, settings(epochs=1, micro_examples=2))
    for name in ("ddp", "zero2"):
        state, rank_stats = results[name]
        assert rank_stats["losses"] == pytest.approx(stats["losses"], abs=1e-5), name
        assert_same_adapter(state, lora.tensors_of(one), atol=1e-5)
