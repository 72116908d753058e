import json

import pytest
import torch
from tiny import batch, calibration, output, tiny_model

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import get_adapter
from optin_hf.tokens import TokenMerging, installed_schedule, match_tokens, merge_matched, merge_rounds


def bipartite_merge(x, sizes, merges):
    return merge_matched(x, sizes, match_tokens(x, merges))
from test_macs import flop_counter_macs


def tau_pruned(arch: str, constraint: float = 0.5, attn: str = "eager"):
    """A tiny model pruned in token mode (random scores: the mechanics do not depend on them)."""
    model = tiny_model(arch, attn=attn)
    pruner = OptinPruner(OptinConfig(mac_constraint=constraint, prune_tokens=True, importance="random"))
    base = count_macs(model)
    pruner.prune_model(model, calibration(arch))
    return model, pruner, base


def test_bipartite_merge_keeps_size_weighted_sums():
    g = torch.Generator().manual_seed(0)
    x, sizes = torch.randn(3, 9, 8, generator=g), torch.randint(1, 4, (3, 9, 1), generator=g).float()
    merged, merged_sizes = bipartite_merge(x, sizes, 3)
    assert merged.shape == (3, 6, 8) and merged_sizes.shape == (3, 6, 1)
    assert torch.equal(merged_sizes.sum(1), sizes.sum(1))
    assert torch.allclose((merged * merged_sizes).sum(1), (x * sizes).sum(1), atol=1e-5)


def test_bipartite_merge_pairs_the_most_similar_tokens():
    e = torch.eye(4)
    # A = tokens 0, 2, 4; B = tokens 1, 3. Only A token 2 has a close B match: token 1.
    x = torch.stack([e[0], e[1] + 0.1 * e[3], e[1], e[3], e[2]])[None]
    merged, sizes = bipartite_merge(x, torch.ones(1, 5, 1), 1)
    assert sizes.flatten().tolist() == [1, 1, 2, 1]  # unmerged A tokens 0 and 4, then B tokens 1 and 3
    assert torch.equal(merged[0, :2], x[0, [0, 4]]) and torch.equal(merged[0, 3], x[0, 3])
    assert torch.allclose(merged[0, 2], (x[0, 1] + x[0, 2]) / 2)


def test_merge_rounds_reach_any_target():
    assert merge_rounds(16, 16) == []
    assert merge_rounds(16, 12) == [(8, 8, 4)]
    assert merge_rounds(16, 3) == [(8, 8, 8), (4, 4, 4), (2, 2, 1)]
    with pytest.raises(ValueError, match="down to 0"):
        merge_rounds(16, 0)


@pytest.mark.parametrize("constraint", [0.6, 0.5])
@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_tau_meets_the_mac_target_by_count_and_by_flop_counter(arch, constraint):
    model, pruner, base = tau_pruned(arch, constraint)
    schedule = pruner.masks.tokens_per_layer()
    assert schedule[0] == get_adapter(model).default_seq_len(model.config) and schedule[-1] < schedule[0]
    assert installed_schedule(model) == schedule
    macs = count_macs(model)
    assert 0.98 * constraint * base <= macs <= constraint * base
    assert flop_counter_macs(model, schedule[0]) == pytest.approx(macs, rel=1e-9)


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_class_tokens_pass_every_merge_unchanged(arch):
    model, pruner, _ = tau_pruned(arch)
    prefix = get_adapter(model).num_prefix_tokens
    seen = []  # (layer input after merging, layer output)
    for layer in get_adapter(model).layers_of(model):
        pair = []
        layer.register_forward_pre_hook(lambda m, args, pair=pair: pair.append(args[0]))  # runs after the merge hook
        layer.register_forward_hook(lambda m, args, out, pair=pair: pair.append(out))
        seen.append(pair)
    output(model, batch(arch))
    assert [inp.shape[1] for inp, _ in seen] == pruner.masks.tokens_per_layer()
    for (_, previous_out), (merged_in, _) in zip(seen, seen[1:]):
        assert torch.equal(merged_in[:, :prefix], previous_out[:, :prefix])
    sizes = model.base_model.token_merging.sizes
    assert sizes.shape[1] == seen[-1][0].shape[1] - prefix and (sizes.sum(1) == 16).all()  # every patch accounted for


def test_tau_model_reloads_with_identical_outputs(tmp_path):
    model, pruner, _ = tau_pruned("deit", attn="sdpa")  # a fresh load picks sdpa too
    pruner.save(model, tmp_path)
    masks = PruningMasks.load(tmp_path / "optin_masks.safetensors")
    assert masks.tokens_per_layer() == pruner.masks.tokens_per_layer()
    assert json.loads((tmp_path / "config.json").read_text())["optin"]["token_schedule"] == masks.tokens_per_layer()
    loaded = AutoOptinModel.from_pretrained(tmp_path)
    assert installed_schedule(loaded) == masks.tokens_per_layer()
    assert torch.equal(output(loaded, batch("deit")), output(model, batch("deit")))


def test_bad_schedules_and_settings_are_refused():
    vit, bert = tiny_model("vit"), tiny_model("bert")
    full = PruningMasks.full(vit.config)
    with pytest.raises(ValueError, match="increases"):
        PruningMasks(full.head_mask, full.neuron_mask, torch.tensor([17, 9, 12]))
    with pytest.raises(ValueError, match="layer 0 must hold all 17"):
        PruningMasks(full.head_mask, full.neuron_mask, torch.tensor([16, 9, 5])).check_fits(vit.config)
    with pytest.raises(ValueError, match="prefix"):
        PruningMasks(full.head_mask, full.neuron_mask, torch.tensor([17, 9, 1])).check_fits(vit.config)
    bert_full = PruningMasks.full(bert.config)
    with pytest.raises(ValueError, match="vision model"):
        PruningMasks(bert_full.head_mask, bert_full.neuron_mask, torch.tensor([10, 9, 8])).check_fits(bert.config)
    with pytest.raises(ValueError, match="needs a vit or deit"):
        OptinPruner(OptinConfig(prune_tokens=True, importance="random")).compute_scores(bert, calibration("bert"))
    with pytest.raises(ValueError, match="importance=.magnitude. gives none"):
        OptinPruner(OptinConfig(prune_tokens=True, importance="magnitude")).compute_masks(vit, calibration("vit"))
    with pytest.raises(ValueError, match="disagrees with the token schedule"):
        count_macs(vit, token_schedule=[17, 9, 5], seq_len=12)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_attention_is_proportional_to_merged_sizes(attn):
    """Two identical tokens merged into one of size 2 leave the class token's output unchanged."""
    model = tiny_model("vit", attn=attn)
    layer = get_adapter(model).layers_of(model)[1]
    cls, a, b = torch.randn(3, 1, 1, 32).unbind(0)
    duplicated = torch.cat([cls, a, a, b], dim=1)  # patches a, a, b: the two a's are the closest pair
    merging = TokenMerging([4, 3], num_prefix_tokens=1)
    assert merging.before_layer(0, layer, (duplicated, None)) is None
    merged, bias = merging.before_layer(1, layer, (duplicated, None))
    assert merged.shape[1] == 3 and torch.allclose(bias.exp().flatten(), torch.tensor([1.0, 1.0, 2.0]))
    with torch.no_grad():
        expected = layer(duplicated, None)[:, 0]
        assert torch.allclose(layer(merged, bias)[:, 0], expected, atol=1e-5)
        assert not torch.allclose(layer(merged, None)[:, 0], expected, atol=1e-3)  # plain attention differs
