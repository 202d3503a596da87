"""Tests for apo_ray.models.loading (resolution, chat formatting, encoding, padding, the reward head) and
for the serving objects built on them: HFGenerator (generation.py) and RewardScorer (scoring.py).

Everything runs on the offline tiny random Llama (SmolLM2's real tokenizer); one test loads the
real SmolLM2-135M-Instruct for a short greedy generation.
"""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch

from apo_ray.config import DecodingConfig
from apo_ray.models.generation import HFGenerator
from apo_ray.models.loading import (
    Encoded,
    encode_prompt_response,
    format_prompt,
    hh_to_messages,
    load_reward_model,
    pad_batch,
    resolve_model,
    response_token_budget,
    reward_forward,
)
from apo_ray.models.scoring import RewardScorer

TINY = "tiny-random-llama"

MULTI_TURN = (
    "\n\nHuman: Hi there, can you help me with cooking?"
    "\n\nAssistant: Of course! What would you like to cook?"
    "\n\nHuman: How do I bake sourdough bread at home?"
    "\n\nAssistant:"
)


# ------------------------------------------------------------------------------ resolution


def test_tiny_alias_resolves_to_a_local_folder_with_config(tiny_model):
    path = Path(resolve_model("tiny-random-llama"))
    assert path.is_dir()
    assert (path / "config.json").is_file()
    assert (path / "tokenizer.json").is_file() or (path / "tokenizer_config.json").is_file()
    assert resolve_model("TINY") == str(path)  # aliases are case-insensitive


@pytest.mark.parametrize("name", ["HuggingFaceTB/SmolLM2-135M-Instruct", "gpt2", "/some/local/folder"])
def test_non_alias_names_pass_through_unchanged(name):
    assert resolve_model(name) == name


# ------------------------------------------------------------------------------ HH -> chat


def test_hh_to_messages_multi_turn():
    messages = hh_to_messages(MULTI_TURN)
    assert messages == [
        {"role": "user", "content": "Hi there, can you help me with cooking?"},
        {"role": "assistant", "content": "Of course! What would you like to cook?"},
        {"role": "user", "content": "How do I bake sourdough bread at home?"},
    ]


def test_hh_to_messages_on_real_hh_prompts(hh_pairs):
    multi = [p.prompt for p in hh_pairs if p.prompt.count("\n\nHuman:") >= 3][:20]
    assert multi, "expected multi-turn dialogues in the HH data"
    for prompt in multi:
        messages = hh_to_messages(prompt)
        roles = [m["role"] for m in messages]
        # Strictly alternating, starting and ending with the user (the trailing empty
        # "Assistant:" turn, the one to be answered, is dropped).
        assert roles == ["user", "assistant"] * (len(roles) // 2) + ["user"]
        assert roles.count("user") == prompt.count("\n\nHuman:")
        assert all(m["content"] == m["content"].strip() for m in messages)


def test_format_prompt_ends_with_generation_prompt_and_keeps_user_turns(tiny_tokenizer):
    text = format_prompt(tiny_tokenizer, MULTI_TURN)
    assert text.endswith("<|im_start|>assistant\n")
    for turn in ("Hi there, can you help me with cooking?", "How do I bake sourdough bread at home?",
                 "Of course! What would you like to cook?"):
        assert turn in text
    assert "Human:" not in text and "Assistant:" not in text  # HH markers became chat roles
    # the last user turn comes after the earlier ones
    assert text.index("sourdough") > text.index("cooking")


# ------------------------------------------------------------------------------ encoding


def test_encode_prompt_response_without_truncation(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = format_prompt(tok, MULTI_TURN)
    enc = encode_prompt_response(tok, prompt, "Mix flour and water.", max_length=512)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    r_ids = tok("Mix flour and water.", add_special_tokens=False)["input_ids"]
    assert enc.input_ids == p_ids + r_ids + [tok.eos_token_id]
    assert enc.loss_mask == [0] * len(p_ids) + [1] * (len(r_ids) + 1)


def test_encode_prompt_response_left_truncates_the_prompt(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = format_prompt(tok, MULTI_TURN)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    response = "Mix flour and water."
    r_ids = tok(response, add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
    max_length = 24
    assert len(p_ids) + len(r_ids) > max_length
    enc = encode_prompt_response(tok, prompt, response, max_length=max_length)
    assert len(enc.input_ids) == max_length
    n_prompt = max_length - len(r_ids)
    # the END of the prompt is kept (its generation prompt included), the response is whole
    assert enc.input_ids[:n_prompt] == p_ids[-n_prompt:]
    assert enc.input_ids[n_prompt:] == r_ids
    assert enc.input_ids[-1] == tok.eos_token_id
    assert enc.loss_mask == [0] * n_prompt + [1] * len(r_ids)
    assert sum(enc.loss_mask) == len(r_ids)


def test_encode_prompt_response_cuts_an_overlong_response_on_the_right(tiny_tokenizer):
    tok = tiny_tokenizer
    prompt = format_prompt(tok, MULTI_TURN)
    response = " ".join(["bread"] * 100)
    max_length = 40
    enc = encode_prompt_response(tok, prompt, response, max_length=max_length)
    assert len(enc.input_ids) == max_length
    r_ids = tok(response, add_special_tokens=False)["input_ids"]
    n_resp = sum(enc.loss_mask)
    assert enc.loss_mask[-n_resp:] == [1] * n_resp and 0 not in enc.loss_mask[-n_resp:]
    # the response's beginning is kept, and it still ends with the end-of-turn token the RM reads
    assert enc.input_ids[-n_resp:] == r_ids[:n_resp - 1] + [tok.eos_token_id]
    assert n_resp - 1 == response_token_budget(max_length) == 40 - 10 - 1
    n_prompt = len(enc.input_ids) - n_resp
    assert n_prompt >= max_length // 4  # the prompt keeps at least a quarter
    assert enc.input_ids[:n_prompt] == tok(prompt, add_special_tokens=False)["input_ids"][-n_prompt:]


def test_gold_and_samples_share_one_budget_and_always_end_with_the_end_token(tiny_tokenizer):
    # Issue 21's artifact: a long gold answer lost its end token while short samples kept theirs, so
    # the RM could tell gold from samples by the token it reads the score at.
    tok = tiny_tokenizer
    prompt = format_prompt(tok, MULTI_TURN)
    p_ids = tok(prompt, add_special_tokens=False)["input_ids"]
    gold = " ".join(["Knead the dough gently"] * 30)  # far over any budget
    sample = "Mix flour and water, then knead."  # under it
    g_ids, s_ids = (tok(t, add_special_tokens=False)["input_ids"] for t in (gold, sample))
    max_length, budget = 80, 12
    assert len(s_ids) < budget < len(g_ids)
    g = encode_prompt_response(tok, prompt, gold, max_length, max_response_tokens=budget)
    s = encode_prompt_response(tok, prompt, sample, max_length, max_response_tokens=budget)
    for enc in (g, s):
        assert enc.input_ids[-1] == tok.eos_token_id and enc.loss_mask[-1] == 1
        assert len(enc.input_ids) <= max_length
    assert g.input_ids[-(budget + 1):] == g_ids[:budget] + [tok.eos_token_id]  # gold: its first `budget` tokens
    assert sum(g.loss_mask) == budget + 1
    assert s.input_ids[-(len(s_ids) + 1):] == s_ids + [tok.eos_token_id]  # the sample: whole
    # both keep the END of the same prompt, as much as fits beside their response
    for enc in (g, s):
        n_prompt = len(enc.input_ids) - sum(enc.loss_mask)
        assert enc.input_ids[:n_prompt] == p_ids[-n_prompt:]
        assert n_prompt == min(len(p_ids), max_length - sum(enc.loss_mask))
    # the budget is capped so the prompt keeps a quarter; an end token in the text is not doubled
    assert response_token_budget(80, 500) == 80 - 20 - 1 and response_token_budget(80) == 59
    twice = encode_prompt_response(tok, prompt, sample + tok.eos_token, max_length)
    assert twice.input_ids == encode_prompt_response(tok, prompt, sample, max_length).input_ids


def test_pad_batch_left_and_right():
    a = Encoded([1, 2, 3, 4], [0, 0, 1, 1])
    b = Encoded([5, 6], [0, 1])
    right = pad_batch([a, b], pad_id=9, side="right")
    assert right["input_ids"].tolist() == [[1, 2, 3, 4], [5, 6, 9, 9]]
    assert right["attention_mask"].tolist() == [[1, 1, 1, 1], [1, 1, 0, 0]]
    assert right["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 1, 0, 0]]
    left = pad_batch([a, b], pad_id=9, side="left")
    assert left["input_ids"].tolist() == [[1, 2, 3, 4], [9, 9, 5, 6]]
    assert left["attention_mask"].tolist() == [[1, 1, 1, 1], [0, 0, 1, 1]]
    assert left["loss_mask"].tolist() == [[0, 0, 1, 1], [0, 0, 0, 1]]
    for batch in (left, right):
        assert all(t.shape == (2, 4) for t in batch.values())


# ------------------------------------------------------------------------------ reward head


@pytest.fixture(scope="module")
def tiny_rm(tiny_model):
    torch.manual_seed(0)
    return load_reward_model(TINY, dtype="float32").eval()


@pytest.fixture(scope="module")
def rm_encodings(tiny_tokenizer, hh_pairs):
    """Prompt+response encodings of clearly different lengths, every one ending in eos (== pad id)."""
    tok = tiny_tokenizer
    assert tok.pad_token_id == tok.eos_token_id  # the case reward_forward must handle
    encs = []
    for pair, max_length in zip(hh_pairs[:4], (40, 64, 29, 52)):
        encs.append(encode_prompt_response(tok, format_prompt(tok, pair.prompt), pair.chosen, max_length))
    assert len({len(e.input_ids) for e in encs}) == len(encs)
    return encs


@torch.no_grad()
def test_reward_forward_same_for_left_and_right_padding(tiny_rm, tiny_tokenizer, rm_encodings):
    pad = tiny_tokenizer.pad_token_id
    right = pad_batch(rm_encodings, pad, side="right")
    left = pad_batch(rm_encodings, pad, side="left")
    r_right = reward_forward(tiny_rm, right["input_ids"], right["attention_mask"])
    r_left = reward_forward(tiny_rm, left["input_ids"], left["attention_mask"])
    assert r_right.shape == (len(rm_encodings),) and r_right.dtype == torch.float32
    torch.testing.assert_close(r_left, r_right, atol=1e-5, rtol=0)
    # The rewards differ between sequences (so the comparison above means something) ...
    assert (r_right.max() - r_right.min()) > 1e-3
    # ... and reading at the last column of the right-padded batch (a pad token) would be wrong.
    hidden = tiny_rm.model(input_ids=right["input_ids"], attention_mask=right["attention_mask"]).last_hidden_state
    naive = tiny_rm.score(hidden[:, -1]).squeeze(-1)
    shorter = right["attention_mask"][:, -1] == 0
    assert (naive[shorter] - r_right[shorter]).abs().min() > 1e-5


@torch.no_grad()
@pytest.mark.parametrize("side", ["left", "right"])
def test_reward_forward_alone_equals_in_a_padded_batch(tiny_rm, tiny_tokenizer, rm_encodings, side):
    pad = tiny_tokenizer.pad_token_id
    batch = pad_batch(rm_encodings, pad, side=side)
    together = reward_forward(tiny_rm, batch["input_ids"], batch["attention_mask"])
    for i, enc in enumerate(rm_encodings):
        one = pad_batch([enc], pad, side=side)
        alone = reward_forward(tiny_rm, one["input_ids"], one["attention_mask"])
        torch.testing.assert_close(alone[0], together[i], atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------ generation


@pytest.fixture(scope="module")
def tiny_generator(tiny_model):
    return HFGenerator(TINY, decoding=DecodingConfig(max_new_tokens=6, temperature=1.0), max_prompt_tokens=48,
                       prompts_per_batch=2, dtype="float32", device="cpu")


@pytest.fixture(scope="module")
def prompts(hh_pairs):
    return [hh_pairs[i].prompt for i in (0, 3, 7, 11, 19)]


def test_generator_returns_n_strings_per_prompt(tiny_generator, prompts):
    out = tiny_generator.generate(prompts, n=3, seed=0)
    assert len(out) == len(prompts)
    assert all(len(samples) == 3 and all(isinstance(s, str) for s in samples) for samples in out)
    assert any(s for samples in out for s in samples)  # a random model still emits some text
    stats = tiny_generator.last_stats
    assert stats.sequences == 3 * len(prompts) and stats.seconds > 0


def test_generator_seeding(tiny_generator, prompts):
    a = tiny_generator.generate(prompts[:3], n=2, seed=11)
    b = tiny_generator.generate(prompts[:3], n=2, seed=11)
    c = tiny_generator.generate(prompts[:3], n=2, seed=12)
    assert a == b
    assert a != c
    # the S samples of one prompt are not copies of each other
    assert any(len(set(samples)) > 1 for samples in a)


def test_generator_samples_with_only_the_configured_warpers(tiny_generator, prompts, monkeypatch):
    import transformers.generation.logits_process as lp

    used = []
    original = lp.TopKLogitsWarper.__call__

    def spy(self, input_ids, scores):
        used.append(self.top_k)
        return original(self, input_ids, scores)

    monkeypatch.setattr(lp.TopKLogitsWarper, "__call__", spy)
    tiny_generator.generate(prompts[:1], n=1, seed=0)
    assert used == [], f"an implicit top-k={set(used)} filter was applied"


class _LengthEcho:
    """Stands in for the causal LM: every 'generated' sequence is the text ' <k>' where k is the
    number of attended prompt tokens in its row, so outputs can be traced back to their prompts."""

    def __init__(self, tokenizer):
        self.tokenizer, self.batches = tokenizer, []

    def __call__(self, *, attention_mask, **_):
        # the shared prefill: one row per prompt, all but its last token
        self.batches.append((attention_mask.sum(dim=1) + 1).tolist())
        return SimpleNamespace(past_key_values=SimpleNamespace(batch_repeat_interleave=lambda n: None))

    def generate(self, *, input_ids, attention_mask, num_return_sequences, pad_token_id, **kwargs):
        lengths = attention_mask.sum(dim=1).tolist()
        if "past_key_values" not in kwargs:
            self.batches.append(lengths)
        new = [self.tokenizer(f" {k}", add_special_tokens=False)["input_ids"] for k in lengths]
        width = max(len(x) for x in new)
        new = torch.tensor([x + [pad_token_id] * (width - len(x)) for x in new])
        full = torch.cat([input_ids, new], dim=1)
        return full.repeat_interleave(num_return_sequences, dim=0)


def test_generator_keeps_prompt_order_across_length_sorted_batches(tiny_tokenizer, tiny_generator, prompts):
    gen = HFGenerator.__new__(HFGenerator)
    gen.__dict__.update(tiny_generator.__dict__)
    gen.model = echo = _LengthEcho(tiny_tokenizer)
    gen.max_prompt_tokens = 10_000
    lengths = [len(ids) for ids in gen._prompt_ids(prompts)]
    assert len(set(lengths)) == len(lengths) and lengths != sorted(lengths)
    out = gen.generate(prompts, n=2, seed=0)
    assert out == [[str(k), str(k)] for k in lengths]
    # the batches were cut from the length-sorted prompts, prompts_per_batch at a time
    assert [k for batch in echo.batches for k in batch] == sorted(lengths)
    assert [len(b) for b in echo.batches] == [2, 2, 1]


def test_shared_prefill_runs_each_prompt_once_and_samples_as_separate_prefills_would(tiny_generator, prompts,
                                                                                     monkeypatch):
    gen = HFGenerator.__new__(HFGenerator)
    gen.__dict__.update(tiny_generator.__dict__)
    gen.prompts_per_batch = 8
    # Sampling at a temperature so low that it is greedy in effect: samples comparable token for
    # token (temperature 0 would decode once per prompt and skip the shared prefill).
    gen.decoding = DecodingConfig(max_new_tokens=6, temperature=1e-6)
    alone = gen.generate(prompts, n=1, seed=0)  # n = 1: generate's own prefill
    shapes = []
    forward = type(gen.model).forward

    def spy(self, input_ids=None, **kw):
        shapes.append(tuple(input_ids.shape))
        return forward(self, input_ids=input_ids, **kw)

    monkeypatch.setattr(type(gen.model), "forward", spy)
    shared = gen.generate(prompts, n=3, seed=0)
    assert shared == [[a[0]] * 3 for a in alone]
    # one prefill of the 5 prompts (all but their last token), then one token per row per step
    assert shapes[0][0] == len(prompts) and shapes[0][1] > 1
    assert all(s == (3 * len(prompts), 1) for s in shapes[1:]) and len(shapes) > 2


def test_real_smollm2_greedy_generation_is_english_and_in_prompt_order(smollm2_model):
    gen = HFGenerator("smollm2-135m-instruct", decoding=DecodingConfig(max_new_tokens=8, temperature=0.0),
                      max_prompt_tokens=128, prompts_per_batch=2, dtype="float32", device="cpu")
    questions = [
        ("\n\nHuman: Hi!\n\nAssistant: Hello! How can I help you today?"
         "\n\nHuman: What is the capital city of France?\n\nAssistant:"),
        "\n\nHuman: Say hello.\n\nAssistant:",
        "\n\nHuman: What is the capital of Japan?\n\nAssistant:",
    ]
    out = gen.generate(questions, n=1)
    answers = [samples[0] for samples in out]
    assert all(answers), answers
    for a in answers:
        letters = sum(ch.isascii() and ch.isalpha() for ch in a)
        assert letters >= 0.5 * len(a), a
    # the answers belong to their questions although the batches were length-sorted
    assert "Paris" in answers[0], answers
    assert "Tokyo" in answers[2], answers


# ------------------------------------------------------------------------------ scoring


@pytest.fixture(scope="module")
def tiny_scorer(tiny_model):
    torch.manual_seed(0)
    return RewardScorer(TINY, max_length=64, score_batch=2, dtype="float32", device="cpu")


def test_scorer_preserves_order_and_matches_single_scores(tiny_scorer, hh_pairs):
    pairs = hh_pairs[:5]
    prompts = [p.prompt for p in pairs] + [pairs[0].prompt]
    responses = [p.chosen for p in pairs] + ["A short answer."]
    together = tiny_scorer.score(prompts, responses)
    alone = [tiny_scorer.score([p], [r])[0] for p, r in zip(prompts, responses)]
    assert len(together) == len(prompts)
    assert together == pytest.approx(alone, abs=1e-5)
    assert max(together) - min(together) > 1e-3  # distinct scores: a mix-up would show
    with pytest.raises(ValueError):
        tiny_scorer.score(prompts, responses[:-1])


def test_a_long_score_call_logs_its_progress(tiny_scorer, hh_pairs, monkeypatch, caplog):
    import logging

    from apo_ray.models import scoring

    monkeypatch.setattr(scoring, "PROGRESS_EVERY_S", 0.0)  # every batch after the first is "long"
    pairs = hh_pairs[:6]
    with caplog.at_level(logging.INFO, logger="apo_ray.models.scoring"):
        tiny_scorer.score([p.prompt for p in pairs], [p.chosen for p in pairs])
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("scoring:")]
    # score_batch=2: batches start at 0, 2, 4; the ones after the first report how far the call is
    assert [m.split(",")[0] for m in lines] == ["scoring: 2 of 6 texts", "scoring: 4 of 6 texts"]
    assert all(m.endswith("texts/s") for m in lines)


def test_scorer_load_weights_changes_scores(tiny_scorer, hh_pairs):
    prompts, responses = [p.prompt for p in hh_pairs[:3]], [p.chosen for p in hh_pairs[:3]]
    original = {k: v.clone() for k, v in tiny_scorer.model.state_dict().items()}
    before = tiny_scorer.score(prompts, responses)
    changed = {k: v.clone() for k, v in original.items()}
    changed["score.weight"] = changed["score.weight"] + 0.5
    try:
        tiny_scorer.load_weights(changed)
        after = tiny_scorer.score(prompts, responses)
        assert all(abs(a - b) > 1e-3 for a, b in zip(after, before))
        tiny_scorer.load_weights(original)
        assert tiny_scorer.score(prompts, responses) == pytest.approx(before, abs=1e-6)
    finally:
        tiny_scorer.load_weights(original)
