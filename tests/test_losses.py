import math

import torch

from optin_hf.losses import (
    balance,
    faithful_weights,
    kl_loss,
    later_layers,
    md_loss,
    position_prior,
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
    assert abs(kl_loss(dense, masked, 4.0).item() - expected) < 1e-6
    assert kl_loss(torch.tensor([[1.0]]), torch.tensor([[3.0]]), 4.0).item() == 0.0  # regression head


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
