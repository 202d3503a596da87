"""Hand-computed checks of apo_ray.core.losses (three-element tensors, arithmetic written out)."""

import math

import pytest
import torch

from apo_ray.core.losses import (
    apo_rm_loss,
    bt_ranking_loss,
    dpo_loss,
    masked_lm_loss,
    sequence_logprobs,
)


def softplus_neg(d: float) -> float:
    """-log sigmoid(d) = log(1 + exp(-d)), written out by hand."""
    return math.log(1.0 + math.exp(-d))


# ----------------------------------------------------------------------------- bt


def test_bt_ranking_loss_hand_computed():
    r_good = torch.tensor([1.0, 0.0, -1.0])
    r_bad = torch.tensor([0.0, 0.5, 1.0])
    # margins d = r_good - r_bad = [1.0, -0.5, -2.0]
    expected = (softplus_neg(1.0) + softplus_neg(-0.5) + softplus_neg(-2.0)) / 3
    # = (0.313262 + 0.974077 + 2.126928) / 3 = 1.138089
    assert bt_ranking_loss(r_good, r_bad).item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(1.138089, abs=1e-6)


def test_bt_zero_margin_is_log2_and_swapping_changes_it():
    r = torch.tensor([0.3, -1.2, 5.0])
    assert bt_ranking_loss(r, r.clone()).item() == pytest.approx(math.log(2), rel=1e-6)
    good, bad = torch.tensor([2.0, 2.0, 2.0]), torch.tensor([0.0, 0.0, 0.0])
    assert bt_ranking_loss(good, bad).item() == pytest.approx(softplus_neg(2.0), rel=1e-6)
    assert bt_ranking_loss(bad, good).item() == pytest.approx(softplus_neg(-2.0), rel=1e-6)


def test_bt_is_finite_for_huge_margins():
    # log(sigmoid(-200)) would be log(0) = -inf in float32; logsigmoid gives 200.
    r_good = torch.tensor([-100.0, 100.0, 0.0])
    r_bad = torch.tensor([100.0, -100.0, 0.0])
    expected = (200.0 + 0.0 + math.log(2)) / 3
    assert bt_ranking_loss(r_good, r_bad).item() == pytest.approx(expected, rel=1e-6)


def test_bt_shape_mismatch_raises():
    with pytest.raises(ValueError):
        bt_ranking_loss(torch.zeros(3), torch.zeros(2))


# ----------------------------------------------------------------------------- apo_rm


def test_apo_rm_loss_hand_computed_with_both_weights():
    r_gold = torch.tensor([2.0, 1.0, 0.0])
    r_sample = torch.tensor([0.0, 1.0, 1.0])  # d_apo = [2, 0, -1]
    r_good = torch.tensor([1.0, 0.5, 0.0])
    r_bad = torch.tensor([0.0, 1.0, 3.0])  # d_pref = [1, -0.5, -3]
    apo = (softplus_neg(2.0) + math.log(2) + softplus_neg(-1.0)) / 3
    pref = (softplus_neg(1.0) + softplus_neg(-0.5) + softplus_neg(-3.0)) / 3
    # paper convention: apo_weight 1, beta2 10
    got = apo_rm_loss(r_gold, r_sample, r_good, r_bad, beta2=10.0)
    assert got.item() == pytest.approx(1.0 * apo + 10.0 * pref, rel=1e-6)
    # authors' code convention: preference weight 1, APO weight 0.1
    got = apo_rm_loss(r_gold, r_sample, r_good, r_bad, beta2=1.0, apo_weight=0.1)
    assert got.item() == pytest.approx(0.1 * apo + 1.0 * pref, rel=1e-6)


def test_apo_rm_loss_with_empty_apo_part_is_only_the_preference_term():
    r_good = torch.tensor([1.0, 0.5, 0.0], requires_grad=True)
    r_bad = torch.tensor([0.0, 1.0, 3.0])
    empty = torch.zeros(0, requires_grad=True)
    pref = (softplus_neg(1.0) + softplus_neg(-0.5) + softplus_neg(-3.0)) / 3
    got = apo_rm_loss(empty, empty.detach(), r_good, r_bad, beta2=10.0, apo_weight=0.1)
    assert got.item() == pytest.approx(10.0 * pref, rel=1e-6)
    got.backward()
    assert torch.isfinite(r_good.grad).all() and (r_good.grad != 0).all()


def test_apo_rm_loss_with_empty_preference_part_is_only_the_apo_term():
    r_gold = torch.tensor([2.0, 1.0, 0.0])
    r_sample = torch.tensor([0.0, 1.0, 1.0])
    apo = (softplus_neg(2.0) + math.log(2) + softplus_neg(-1.0)) / 3
    got = apo_rm_loss(r_gold, r_sample, torch.zeros(0), torch.zeros(0), beta2=10.0, apo_weight=0.1)
    assert got.item() == pytest.approx(0.1 * apo, rel=1e-6)
    assert not torch.isnan(got)


def test_apo_rm_loss_both_empty_raises():
    e = torch.zeros(0)
    with pytest.raises(ValueError):
        apo_rm_loss(e, e, e, e, beta2=10.0)


def test_apo_rm_loss_beta2_is_keyword_only():
    x = torch.zeros(3)
    with pytest.raises(TypeError):
        apo_rm_loss(x, x, x, x, 10.0)  # type: ignore[misc]


def test_apo_rm_loss_pooled_is_the_authors_per_pair_weighted_mean():
    """The authors' code: every pair of a batch weighs 1/N; an APO pair also apo_coeff / S, a
    preference pair rm_kl_coeff. Here 2 APO pairs (S = 2) and 3 preference pairs, N = 5."""
    r_gold, r_sample = torch.tensor([2.0, 1.0]), torch.tensor([0.0, 1.0])  # d_apo = [2, 0]
    r_good, r_bad = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 1.0, 3.0])  # d_pref = [1, -0.5, -3]
    apo_sum = softplus_neg(2.0) + math.log(2)  # 0.126928 + 0.693147
    pref_sum = softplus_neg(1.0) + softplus_neg(-0.5) + softplus_neg(-3.0)  # 0.313262 + 0.974077 + 3.048587
    expected = (0.1 / 2 * apo_sum + 1.0 * pref_sum) / 5
    got = apo_rm_loss(r_gold, r_sample, r_good, r_bad, beta2=1.0, apo_weight=0.1, reduction="pooled",
                      samples_per_query=2)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.875386, abs=1e-6)
    # The paper's per-term means give another number for the same pairs and weights.
    per_term = apo_rm_loss(r_gold, r_sample, r_good, r_bad, beta2=1.0, apo_weight=0.1 / 2)
    assert per_term.item() == pytest.approx(0.05 * apo_sum / 2 + pref_sum / 3, rel=1e-6)
    assert abs(per_term.item() - expected) > 0.4


def test_apo_rm_loss_rejects_an_unknown_reduction():
    x = torch.zeros(2)
    with pytest.raises(ValueError, match="per_term"):
        apo_rm_loss(x, x, x, x, beta2=1.0, reduction="mean")


@pytest.mark.parametrize("reduction", ["per_term", "pooled"])
def test_apo_rm_loss_shares_of_a_split_step_add_up_to_the_step_loss(reduction):
    """What gradient accumulation relies on: given the whole step's counts, the losses of the
    step's parts add up to the loss of the whole step, however the pairs are split."""
    r_gold, r_sample = torch.tensor([2.0, 1.0, -0.5]), torch.tensor([0.0, 1.0, 0.3])
    r_good, r_bad = torch.tensor([1.0, 0.5]), torch.tensor([0.0, 1.0])
    kw = {"beta2": 3.0, "apo_weight": 0.5, "reduction": reduction, "samples_per_query": 3}
    whole = apo_rm_loss(r_gold, r_sample, r_good, r_bad, **kw)
    # part 1: APO pairs 0-1 and no preference pair; part 2: APO pair 2 and both preference pairs
    part1 = apo_rm_loss(r_gold[:2], r_sample[:2], r_good[:0], r_bad[:0], n_apo=3, n_pref=2, **kw)
    part2 = apo_rm_loss(r_gold[2:], r_sample[2:], r_good, r_bad, n_apo=3, n_pref=2, **kw)
    assert (part1 + part2).item() == pytest.approx(whole.item(), rel=1e-6)
    assert part1.item() != pytest.approx(whole.item(), rel=1e-3)


def test_bt_dpo_and_lm_losses_divide_by_the_step_count_when_given():
    r_good, r_bad = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    assert bt_ranking_loss(r_good, r_bad, n_pairs=4).item() == pytest.approx(
        bt_ranking_loss(r_good, r_bad).item() * 2 / 4, rel=1e-6)
    pc, pr, rc, rr = torch.tensor([-1.0]), torch.tensor([-2.0]), torch.tensor([-1.5]), torch.tensor([-1.5])
    assert dpo_loss(pc, pr, rc, rr, beta=0.5, n_pairs=3).item() == pytest.approx(softplus_neg(0.5) / 3, rel=1e-6)
    logits = torch.zeros(1, 3, 4)  # uniform over 4 tokens: each target costs log 4
    labels, mask = torch.tensor([[0, 1, 2]]), torch.tensor([[0, 1, 1]])
    assert masked_lm_loss(logits, labels, mask, n_tokens=8).item() == pytest.approx(2 * math.log(4) / 8, rel=1e-6)
    with pytest.raises(ValueError):
        bt_ranking_loss(r_good, r_bad, n_pairs=0)


# ----------------------------------------------------------------------------- masked LM


def test_masked_lm_loss_uniform_logits_is_log_vocab():
    logits = torch.zeros(2, 3, 3)  # B=2, T=3, V=3, every distribution uniform
    labels = torch.tensor([[0, 1, 2], [2, 2, 0]])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    assert masked_lm_loss(logits, labels, mask).item() == pytest.approx(math.log(3), rel=1e-6)


def _peaked():
    # B=1, T=3, V=3.
    logits = torch.tensor([[[2.0, 0.0, 0.0], [0.0, 1.0, 0.0], [5.0, 5.0, 5.0]]])
    labels = torch.tensor([[0, 0, 1]])
    # After the shift: position 0 predicts labels[1] = 0, position 1 predicts labels[2] = 1.
    # log p(0 | pos 0) = 2 - log(e^2 + 1 + 1);  log p(1 | pos 1) = 1 - log(1 + e + 1).
    lp0 = 2.0 - math.log(math.exp(2.0) + 2.0)  # = -0.253856
    lp1 = 1.0 - math.log(math.exp(1.0) + 2.0)  # = -0.551445
    return logits, labels, lp0, lp1


def test_masked_lm_loss_peaked_hand_computed():
    logits, labels, lp0, lp1 = _peaked()
    # prompt token at t=0, response tokens at t=1, 2 -> both shifted targets count
    loss = masked_lm_loss(logits, labels, torch.tensor([[0, 1, 1]]))
    assert loss.item() == pytest.approx(-(lp0 + lp1) / 2, rel=1e-6)
    # only t=2 is a response token -> only the prediction made at position 1 counts
    loss = masked_lm_loss(logits, labels, torch.tensor([[0, 0, 1]]))
    assert loss.item() == pytest.approx(-lp1, rel=1e-6)


def test_masked_lm_loss_is_token_mean_over_the_batch_and_ignores_masked_label_values():
    logits1, labels1, lp0, lp1 = _peaked()
    logits = torch.cat([logits1, torch.zeros(1, 3, 3)])
    # masked positions hold the ignore index -100; they must not be gathered
    labels = torch.cat([labels1, torch.tensor([[-100, -100, 2]])])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1]])
    # 3 target tokens: lp0, lp1 from row 0 and log(1/3) from row 1 (uniform logits)
    token_mean = -(lp0 + lp1 + math.log(1 / 3)) / 3
    sequence_mean = (-(lp0 + lp1) / 2 + math.log(3)) / 2
    got = masked_lm_loss(logits, labels, mask).item()
    assert got == pytest.approx(token_mean, rel=1e-6)
    assert got != pytest.approx(sequence_mean, rel=1e-3)


def test_masked_lm_loss_without_target_tokens_raises():
    logits, labels, _, _ = _peaked()
    with pytest.raises(ValueError):
        masked_lm_loss(logits, labels, torch.zeros(1, 3))
    # a mask only on t=0 is empty after the shift (nothing predicts token 0)
    with pytest.raises(ValueError):
        masked_lm_loss(logits, labels, torch.tensor([[1, 0, 0]]))


def test_masked_lm_loss_bf16_logits_computed_in_float32():
    logits, labels, lp0, lp1 = _peaked()
    loss = masked_lm_loss(logits.bfloat16(), labels, torch.tensor([[0, 1, 1]]))
    assert loss.dtype == torch.float32
    # the logit values 0, 1, 2, 5 are exact in bf16, so the float32 result matches
    assert loss.item() == pytest.approx(-(lp0 + lp1) / 2, rel=1e-6)


# ----------------------------------------------------------------------------- sequence logprobs


def test_sequence_logprobs_hand_computed():
    logits1, labels1, lp0, lp1 = _peaked()
    logits = torch.cat([logits1, logits1, torch.zeros(1, 3, 3)])
    labels = torch.cat([labels1, labels1, torch.tensor([[1, 2, 0]])])
    mask = torch.tensor([[0, 1, 1], [0, 0, 1], [0, 1, 1]])
    got = sequence_logprobs(logits, labels, mask)
    assert got.shape == (3,)
    expected = [lp0 + lp1, lp1, 2 * math.log(1 / 3)]
    # = [-0.805301, -0.551445, -2.197225]
    for g, e in zip(got.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-6)


def test_sequence_logprobs_consistent_with_masked_lm_loss():
    torch.manual_seed(0)
    logits = torch.randn(3, 5, 7)
    labels = torch.randint(0, 7, (3, 5))
    mask = torch.tensor([[0, 0, 1, 1, 1], [0, 1, 1, 1, 0], [0, 0, 0, 1, 1]])
    seq = sequence_logprobs(logits, labels, mask)
    n_tokens = mask[:, 1:].sum()
    assert masked_lm_loss(logits, labels, mask).item() == pytest.approx(
        -(seq.sum() / n_tokens).item(), rel=1e-5
    )


# ----------------------------------------------------------------------------- DPO


def test_dpo_loss_hand_computed():
    pc = torch.tensor([-1.0, -2.0, -3.0])
    rc = torch.tensor([-1.5, -2.0, -2.0])  # pc - rc = [0.5, 0.0, -1.0]
    pr = torch.tensor([-2.0, -3.0, -1.0])
    rr = torch.tensor([-1.5, -1.0, -1.0])  # pr - rr = [-0.5, -2.0, 0.0]
    # difference = [1.0, 2.0, -1.0]; times beta=0.5 -> z = [0.5, 1.0, -0.5]
    expected = (softplus_neg(0.5) + softplus_neg(1.0) + softplus_neg(-0.5)) / 3
    # = (0.474077 + 0.313262 + 0.974077) / 3 = 0.587139
    got = dpo_loss(pc, pr, rc, rr, beta=0.5)
    assert got.item() == pytest.approx(expected, rel=1e-6)
    assert expected == pytest.approx(0.587139, abs=1e-6)


def test_dpo_loss_zero_margin_is_log2():
    # policy == reference -> implicit rewards are 0 -> -log sigmoid(0) = log 2, whatever beta
    pc, pr = torch.tensor([-4.0, -1.0, -7.0]), torch.tensor([-2.0, -9.0, -3.0])
    assert dpo_loss(pc, pr, pc.clone(), pr.clone(), beta=0.1).item() == pytest.approx(math.log(2), rel=1e-6)


def test_dpo_loss_argument_order_matters():
    # swapping chosen and rejected flips the sign of z
    pc, pr = torch.tensor([-1.0, -1.0, -1.0]), torch.tensor([-3.0, -3.0, -3.0])
    ref = torch.tensor([-2.0, -2.0, -2.0])
    assert dpo_loss(pc, pr, ref, ref, beta=1.0).item() == pytest.approx(softplus_neg(2.0), rel=1e-6)
    assert dpo_loss(pr, pc, ref, ref, beta=1.0).item() == pytest.approx(softplus_neg(-2.0), rel=1e-6)


# ----------------------------------------------------------------------------- gradients


def _assert_grad_ok(t: torch.Tensor) -> None:
    assert t.grad is not None
    assert torch.isfinite(t.grad).all()
    assert t.grad.abs().sum() > 0


def test_gradients_flow_through_reward_losses():
    r_good = torch.tensor([1.0, 0.0, -1.0], requires_grad=True)
    r_bad = torch.tensor([0.0, 0.5, 1.0], requires_grad=True)
    bt_ranking_loss(r_good, r_bad).backward()
    _assert_grad_ok(r_good)
    _assert_grad_ok(r_bad)
    # d/d r_good of mean softplus(-(g - b)) = -sigmoid(-(g - b)) / 3
    expected = [-1 / (1 + math.exp(d)) / 3 for d in (1.0, -0.5, -2.0)]
    for g, e in zip(r_good.grad.tolist(), expected):
        assert g == pytest.approx(e, rel=1e-5)

    gold = torch.tensor([2.0, 1.0, 0.0], requires_grad=True)
    sample = torch.tensor([0.0, 1.0, 1.0], requires_grad=True)
    good = torch.tensor([1.0, 0.5, 0.0], requires_grad=True)
    bad = torch.tensor([0.0, 1.0, 3.0], requires_grad=True)
    apo_rm_loss(gold, sample, good, bad, beta2=10.0, apo_weight=0.1).backward()
    for t in (gold, sample, good, bad):
        _assert_grad_ok(t)


def test_gradients_flow_through_lm_and_dpo_losses():
    torch.manual_seed(0)
    logits = torch.randn(2, 4, 5, requires_grad=True)
    labels = torch.randint(0, 5, (2, 4))
    mask = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1]])
    masked_lm_loss(logits, labels, mask).backward()
    _assert_grad_ok(logits)
    # the last position predicts nothing and must get no gradient
    assert logits.grad[:, -1].abs().sum() == 0

    logits2 = torch.randn(3, 4, 5, requires_grad=True)
    labels2 = torch.randint(0, 5, (3, 4))
    mask2 = torch.tensor([[0, 1, 1, 1], [0, 0, 1, 1], [0, 1, 1, 0]])
    seq = sequence_logprobs(logits2, labels2, mask2)
    ref = torch.tensor([-5.0, -6.0, -7.0])
    # pair every row as chosen against another row as rejected
    pc, pr = seq[[0, 1, 2]], seq[[2, 0, 1]]
    dpo_loss(pc, pr, ref, ref.flip(0), beta=0.1).backward()
    _assert_grad_ok(logits2)
