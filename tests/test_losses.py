import math

import torch

from optin_hf.losses import (
    KLOutputs,
    balance,
    faithful_weights,
    kl_loss,
    later_layers,
    md_loss,
    position_prior,
    select_examples,
    token_gram,
    token_md_loss,
    token_scores,
)


def test_balance_follows_reference_rule_and_order():
    md = torch.tensor([[2000.0, 1.0, 50.0]])
    kl = torch.tensor([[1.0, 5.0, 0.0]])
    scores = balance(md, kl, lambda_contribution=10.0)
    # 1st: MD/KL=2000 -> 10^int(3.30-1)=100; 2nd: MD<KL -> mean so far (100); 3rd: KL=0 -> mean, adds 0.
    assert scores.tolist() == [[2000.0 + 100.0, 1.0 + 100.0 * 5.0, 50.0]]


def test_balance_uses_one_when_no_factor_yet():
    assert balance(torch.tensor([[1.0]]), torch.tensor([[3.0]]), 10.0).item() == 4.0


def test_md_loss_zero_for_identical_and_positive_otherwise():
    rows = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    gram = rows @ rows.T
    assert md_loss(gram, rows).item() < 1e-10
    other = torch.nn.functional.normalize(torch.randn(6, 4), dim=-1)
    assert md_loss(gram, other).item() > 0.1


def test_kl_is_sum_times_t_squared_without_dividing_logits():
    dense, masked = torch.tensor([[2.0, 0.0]]), torch.tensor([[0.0, 0.0]])
    p = torch.softmax(dense.double(), -1)  # kl_loss computes in float64
    expected = float((p * (p.log() - math.log(0.5))).sum()) * 16
    assert abs(kl_loss([KLOutputs.of(dense)], [KLOutputs.of(masked)], 4.0).item() - expected) < 1e-6
    regression = [KLOutputs.of(torch.tensor([[1.0]]))], [KLOutputs.of(torch.tensor([[3.0]]))]
    assert kl_loss(*regression, 4.0).item() == 0.0
    assert kl_loss([None], [None], 4.0).item() == 0.0  # a bare encoder


def test_kl_with_a_valid_mask_is_the_kl_of_the_valid_positions_alone():
    """Each example's KL is the mean over its valid positions only: garbage logits (NaN included) at
    masked positions change nothing, and batches of different lengths are summed without being joined."""
    g = torch.Generator().manual_seed(0)
    dense, masked = torch.randn(2, 5, 3, generator=g), torch.randn(2, 5, 3, generator=g)
    valid = torch.tensor([[True, True, False, True, False], [False, True, False, False, False]])
    garbage = lambda x: x.masked_fill(~valid[..., None], float("nan"))  # noqa: E731
    got = kl_loss([KLOutputs(garbage(dense), valid)], [KLOutputs(garbage(masked), valid)], 2.0)
    alone = [kl_loss([KLOutputs(dense[n, valid[n]][None], torch.ones(1, int(valid[n].sum()), dtype=torch.bool))],
                     [KLOutputs(masked[n, valid[n]][None], torch.ones(1, int(valid[n].sum()), dtype=torch.bool))], 2.0)
             for n in range(2)]
    assert torch.isfinite(got) and math.isclose(float(got), float(sum(alone)), rel_tol=1e-12)
    p, q = dense[1, 1].double().softmax(0), masked[1, 1].double().softmax(0)
    assert math.isclose(float(alone[1]), 4 * float((p * (p / q).log()).sum()), rel_tol=1e-12)
    # batches of 5 and 2 positions: their sum, never one tensor
    short = KLOutputs(dense[:, :2], torch.ones(2, 2, dtype=torch.bool))
    both = kl_loss([KLOutputs(dense, valid), short], [KLOutputs(masked, valid), KLOutputs(masked[:, :2], short.valid)], 2.0)
    assert math.isclose(float(both), float(got) + float(kl_loss([short], [KLOutputs(masked[:, :2], short.valid)], 2.0)))


def test_select_examples_regroups_without_joining_positions():
    """The fast engine's packs take their examples from several batches: each keeps its own positions,
    a shorter one padded with invalid positions, so its KL is unchanged."""
    a = KLOutputs(torch.randn(2, 3, 4), torch.ones(2, 3, dtype=torch.bool))
    b = KLOutputs(torch.randn(1, 1, 4), torch.ones(1, 1, dtype=torch.bool))
    [first, second] = select_examples([a, b], [2, 1], torch.tensor([2, 0, 1]))
    assert first.logits.shape == (2, 3, 4) and first.valid.tolist() == [[True, False, False], [True, True, True]]
    assert torch.equal(first.logits[0, :1], b.logits[0]) and torch.equal(first.logits[1], a.logits[0])
    assert torch.equal(second.logits, a.logits[1:])


def test_later_layers_and_faithful_weights():
    assert list(later_layers(0, 3)) == [1, 2] and list(later_layers(2, 3)) == [2]
    prior = position_prior(4, 10.0)
    assert prior[0].item() == 10.0 and abs(prior[-1].item() - 1.0) < 1e-12
    heads = faithful_weights(3, 4, "head")
    assert heads[0, 0].item() == 5.0 and heads[2, 0].item() == 2.5  # x0.5 decay, x0.5 last layer
    neurons = faithful_weights(2, 3, "neuron")
    assert neurons[0, 0].item() == 100.0 and neurons[1, 0].item() == 50.0


def test_token_gram_averages_per_token_inter_sample_grams():
    feature = torch.randn(5, 7, 4)
    rows = torch.nn.functional.normalize(feature, dim=-1).permute(1, 0, 2)  # [tokens, batch, dim]
    assert torch.allclose(token_gram(feature), (rows @ rows.transpose(1, 2)).mean(0), atol=1e-6)
    assert token_md_loss(token_gram(feature), token_gram(feature[:, 1:])).item() > 0


def test_token_scores_weight_depth_decay_and_last_layer():
    md = torch.tensor([[0.0, 0.0], [1000.0, 1000.0], [1000.0, 1000.0]])
    kl = torch.tensor([[0.0, 0.0], [1.0, 1.0], [1.0, 1.0]])
    scores = token_scores(md, kl, lambda_contribution=10.0, max_patch_envelope=100.0, patch_metric_decay=2.0)
    # depth = [1, 10, 100]; layer 1: MD 10^4, KL x 10^int(4 - 1); layer 2: MD 10^5, KL x 10^4, then x0.5.
    assert scores[0].tolist() == [0.0, 0.0]
    assert scores[1].tolist() == [2 * (1e4 + 1e3)] * 2
    assert scores[2].tolist() == [0.5 * 2 * (1e5 + 1e4)] * 2
