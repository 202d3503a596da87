"""FastSampler (apo_ray/models/fastgen.py) against transformers ``generate`` on the tiny random Llama, CPU, fp32.

The CUDA-graph path is the same step function replayed; these tests pin down the eager step:
greedy equals ``generate(do_sample=False)`` token for token on a left-padded batch, sampling equals
``generate(do_sample=True)`` for the same global seed (the draw is torch.multinomial's), one-step
frequencies match softmax(logits / T) after top-p, and EOS rows emit pad afterwards.
"""

from __future__ import annotations

import pytest
import torch

from apo_ray.models.fastgen import FastSampler, process_logits, sample_next


@pytest.fixture(scope="module")
def model(tiny_model):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_model, dtype=torch.float32).eval()


def _left_padded(pad: int, lengths=(7, 3, 5, 1), vocab: int = 1000, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(3, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids, mask


def _hf(model, ids, mask, new, **kwargs):
    out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=new, pad_token_id=0, **kwargs)
    return out[:, ids.shape[1]:]


def test_prefill_and_decode_logits_match_a_full_forward(model):
    ids, mask = _left_padded(pad=0)
    sampler = FastSampler(model, max_batch=4, max_len=32)
    new = sampler.generate(ids, mask, max_new_tokens=4, temperature=0)
    full_ids = torch.cat([ids, new], 1)
    full_mask = torch.cat([mask, torch.ones_like(new)], 1)
    positions = (full_mask.cumsum(-1) - 1).clamp(min=0)
    ref = model(input_ids=full_ids, attention_mask=full_mask, position_ids=positions).logits[:, -1]
    # generate leaves the last token in `tok` at its position/slot: one more step scores it
    got = sampler._decode(4, sampler.max_len)
    torch.testing.assert_close(got, ref, atol=1e-4, rtol=1e-4)


def test_greedy_equals_hf_generate_on_left_padded_prompts(model):
    ids, mask = _left_padded(pad=0)
    ref = _hf(model, ids, mask, 12, do_sample=False, eos_token_id=None)
    got = FastSampler(model, max_batch=8, max_len=64).generate(ids, mask, max_new_tokens=12, temperature=0)
    assert torch.equal(got, ref)


def test_repetition_penalty_equals_hf_generate(model):
    # Equal-length prompts: HF also penalises the pad id of left-padded rows, FastSampler does not.
    ids, mask = _left_padded(pad=0, lengths=(6, 6, 6, 6))
    plain = FastSampler(model, max_batch=4, max_len=64).generate(ids, mask, max_new_tokens=12, temperature=0)
    ref = _hf(model, ids, mask, 12, do_sample=False, eos_token_id=None, repetition_penalty=5.0)
    got = FastSampler(model, max_batch=4, max_len=64).generate(ids, mask, max_new_tokens=12, temperature=0,
                                                                repetition_penalty=5.0)
    assert torch.equal(got, ref)
    assert not torch.equal(got, plain)  # the random model repeats itself: the penalty changes that


def test_apply_repetition_penalty_arithmetic():
    from apo_ray.models.fastgen import apply_repetition_penalty

    logits = torch.tensor([[2.0, -2.0, 2.0, -2.0]])
    seen = torch.tensor([[True, True, False, False]])
    # seen and positive: / 2; seen and negative: * 2; unseen: unchanged
    assert apply_repetition_penalty(logits, seen, 2.0).tolist() == [[1.0, -4.0, 2.0, -2.0]]


@pytest.mark.parametrize("temperature,top_p,top_k", [(1.0, 1.0, 0), (0.7, 0.9, 0), (1.3, 0.8, 50)])
def test_sampling_equals_hf_generate_for_the_same_seed(model, temperature, top_p, top_k):
    ids, mask = _left_padded(pad=0, seed=1)
    torch.manual_seed(123)
    ref = _hf(model, ids, mask, 10, do_sample=True, temperature=temperature, top_p=top_p, top_k=top_k,
              eos_token_id=None)
    torch.manual_seed(123)
    got = FastSampler(model, max_batch=4, max_len=32).generate(
        ids, mask, max_new_tokens=10, temperature=temperature, top_p=top_p, top_k=top_k)
    assert torch.equal(got, ref)


def test_sampling_with_a_generator_is_reproducible(model):
    ids, mask = _left_padded(pad=0)
    sampler = FastSampler(model, max_batch=4, max_len=32)
    a = sampler.generate(ids, mask, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    b = sampler.generate(ids, mask, max_new_tokens=8, generator=torch.Generator().manual_seed(5))
    c = sampler.generate(ids, mask, max_new_tokens=8, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_process_logits_top_p_arithmetic():
    # probs 0.5, 0.3, 0.15, 0.05: top_p 0.75 keeps the smallest set reaching 0.75 -> {0.5, 0.3}
    logits = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    kept = process_logits(logits, 1.0, None, 0.75).isfinite()
    assert kept.tolist() == [[True, True, False, False]]
    kept = process_logits(logits, 1.0, 3, 1.0).isfinite()  # top-k 3
    assert kept.tolist() == [[True, True, True, False]]


def test_one_step_frequencies_match_softmax_after_top_p():
    torch.manual_seed(0)
    logits = torch.randn(1, 20) * 2
    temperature, top_p, n = 0.8, 0.9, 200_000
    expected = process_logits(logits, temperature, None, top_p).softmax(-1)[0]
    gen = torch.Generator().manual_seed(1)
    draws = sample_next(logits.expand(n, -1), temperature, None, top_p, gen)
    freq = torch.bincount(draws, minlength=20).float() / n
    assert (freq[expected == 0] == 0).all()  # nothing outside the nucleus
    tv = 0.5 * (freq - expected).abs().sum()
    assert tv < 0.01, tv


def test_model_one_step_frequencies_match_softmax_after_top_p(model):
    # One prompt repeated in 500 rows: each row's first token is an independent draw.
    ids, mask = _left_padded(pad=0, lengths=(5,))
    n, temperature, top_p = 500, 0.08, 0.6  # random tiny model: flat logits, so a low temperature
    logits = model(input_ids=ids, attention_mask=mask).logits[0, -1]
    expected = process_logits(logits[None], temperature, None, top_p).softmax(-1)[0]
    sampler = FastSampler(model, max_batch=n, max_len=8)
    draws = sampler.generate(ids.expand(n, -1), mask.expand(n, -1), max_new_tokens=1, temperature=temperature,
                             top_p=top_p, generator=torch.Generator().manual_seed(0))[:, 0]
    assert (expected[draws] > 0).all()  # nothing outside the nucleus
    freq = torch.bincount(draws, minlength=expected.numel()).float() / n
    order = expected.argsort(descending=True)
    buckets = [order[:1], order[1:5], order[5:]]  # top token ~0.77, next four ~0.04, the tail ~0.19
    exp_b = torch.stack([expected[b].sum() for b in buckets])
    got_b = torch.stack([freq[b].sum() for b in buckets])
    assert 0.5 * (got_b - exp_b).abs().sum() < 0.07, (got_b, exp_b)


def test_eos_rows_emit_pad_and_generation_stops_when_all_finished(model):
    ids, mask = _left_padded(pad=0)
    greedy = FastSampler(model, max_batch=4, max_len=64).generate(ids, mask, max_new_tokens=12, temperature=0)
    eos = int(greedy[0, 2])  # row 0 emits this at step 2 (or earlier): use it as EOS
    first = int((greedy[0] == eos).nonzero()[0])
    ref = _hf(model, ids, mask, 12, do_sample=False, eos_token_id=eos)
    sampler = FastSampler(model, max_batch=4, max_len=64, check_every=2)
    got = sampler.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=eos, pad_token_id=0)
    assert torch.equal(got, ref)
    row0 = got[0].tolist()
    assert row0[first] == eos and all(t == 0 for t in row0[first + 1:])
    # every row stops on EOS -> output trimmed where the last one finished
    first = greedy[:, 0]
    got = sampler.generate(ids, mask, max_new_tokens=12, temperature=0, eos_token_id=first.tolist(), pad_token_id=0)
    assert got.shape == (4, 1) and torch.equal(got[:, 0], first)


def test_min_new_tokens_masks_eos(model):
    ids, mask = _left_padded(pad=0)
    greedy = FastSampler(model, max_batch=4, max_len=64).generate(ids, mask, max_new_tokens=4, temperature=0)
    eos = greedy[:, 0].tolist()
    got = FastSampler(model, max_batch=4, max_len=64).generate(
        ids, mask, max_new_tokens=4, temperature=0, eos_token_id=eos, pad_token_id=0, min_new_tokens=4)
    assert got.shape == (4, 4) and not torch.isin(got[:, :4], torch.tensor(eos)).any()


def test_hf_generator_fast_path_gives_the_same_samples(tiny_model):
    from apo_ray.config import DecodingConfig
    from apo_ray.models.generation import HFGenerator

    gen = HFGenerator(tiny_model, decoding=DecodingConfig(max_new_tokens=6, temperature=0.7, top_p=0.9), fast=True,
                      device="cpu")
    assert not gen.fast  # the flag only takes effect on CUDA...
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: what is two plus two?\n\nAssistant:"]
    ref = gen.generate(prompts, n=2, seed=0)
    gen.fast = True  # ...but the routed path itself runs on CPU
    assert gen.generate(prompts, n=2, seed=0) == ref


@pytest.mark.parametrize("family", ["qwen2", "qwen3"])
def test_greedy_equals_hf_generate_on_other_families(family):
    import transformers

    config_cls = {"qwen2": "Qwen2Config", "qwen3": "Qwen3Config"}[family]
    if not hasattr(transformers, config_cls):
        pytest.skip(f"transformers has no {config_cls}")
    config = getattr(transformers, config_cls)(
        hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
        vocab_size=1000, tie_word_embeddings=True, rope_theta=1e6, head_dim=16)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(config, dtype=torch.float32).eval()
    for p in model.parameters():  # biases start at zero: make them count
        torch.nn.init.normal_(p, std=0.5 if p.ndim == 1 else 0.1)
    ids, mask = _left_padded(pad=0)
    ref = _hf(model, ids, mask, 10, do_sample=False, eos_token_id=None)
    got = FastSampler(model, max_batch=4, max_len=32).generate(ids, mask, max_new_tokens=10, temperature=0)
    assert torch.equal(got, ref)
