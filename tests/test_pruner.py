import copy
import dataclasses
import math
import os

import pytest
import torch
from tiny import ARCHS, FAMILIES, batch, calibration, family, output, tiny_model
from transformers import AutoModelForSequenceClassification, OPTConfig, OPTModel

import optin_hf.pruner
from optin_hf import AutoOptinModel, ImportanceScores, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import get_adapter
from optin_hf.channel_search import least_widths
from optin_hf.checkpoint import save_pruned
from optin_hf.hooks import apply_masks
from optin_hf.losses import KLOutputs, kl_loss
from optin_hf.result import pruning_result


@pytest.mark.parametrize("constraint", [0.8, 0.5])
@pytest.mark.parametrize("arch", ARCHS)
def test_slim_macs_meet_budget_within_two_percent(arch, constraint):
    model = tiny_model(arch)
    pruner = OptinPruner(OptinConfig(mac_constraint=constraint, importance="magnitude", reconstruct="none"))
    data = calibration(arch)
    base = count_macs(model, pruner.compute_masks(model, data) and pruner.seq_len)
    inputs = batch(arch)
    with apply_masks(model, get_adapter(model), pruner.masks.head_mask.float(), pruner.masks.neuron_mask.float()):
        masked = output(model, inputs)
    pruner.prune_model(model, masks=pruner.masks)
    macs = count_macs(model, pruner.seq_len)
    assert 0.98 * constraint * base <= macs <= constraint * base
    assert (output(model, inputs) - masked).abs().max() < 1e-4


def test_seq_len_is_average_unpadded_length():
    data = calibration("bert")
    pruner = OptinPruner(OptinConfig(importance="random", num_samples=len(data)))
    pruner.compute_masks(tiny_model("bert"), data)
    assert pruner.seq_len == pytest.approx(sum(len(d["input_ids"]) for d in data) / len(data))


def test_optin_scores_deterministic_for_fixed_seed():
    data = calibration("bert", n=6)
    config = OptinConfig(importance="optin", md_tokens=20, num_samples=6, batch_size=4)
    a = OptinPruner(config).compute_scores(tiny_model("bert"), data)
    b = OptinPruner(config).compute_scores(tiny_model("bert"), data)
    assert torch.equal(a.head_scores, b.head_scores) and torch.equal(a.neuron_scores, b.neuron_scores)
    c = OptinPruner(dataclasses.replace(config, seed=1)).compute_scores(tiny_model("bert"), data)
    assert not torch.equal(a.neuron_scores, c.neuron_scores)  # the seed picks the MD token subset
    assert (a.head_scores > 0).all() and a.head_scores.shape == (3, 4) and a.neuron_scores.shape == (3, 48)


def train_tiny_classifier() -> tuple[torch.nn.Module, list[dict[str, torch.Tensor]]]:
    """A tiny BERT that learns which of three marker tokens a sequence holds most of."""
    model = tiny_model("bert")
    model.train()
    g = torch.Generator().manual_seed(0)

    def sample(n):
        ids = torch.randint(10, 120, (n, 12), generator=g)
        labels = torch.randint(0, 3, (n,), generator=g)
        for i in range(n):
            pos = torch.randperm(12, generator=g)[:4]
            ids[i, pos] = 5 + labels[i]
        return ids, labels

    opt = torch.optim.Adam(model.parameters(), lr=3e-3)
    for _ in range(150):
        ids, labels = sample(32)
        loss = model(input_ids=ids, labels=labels).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
    model.eval()
    ids, labels = sample(64)
    with torch.no_grad():
        assert (model(input_ids=ids).logits.argmax(-1) == labels).float().mean() > 0.9
    return model, [{"input_ids": row} for row in ids[:32]]


def test_top_scored_head_matters_more_than_bottom_on_trained_model():
    model, data = train_tiny_classifier()
    scores = OptinPruner(OptinConfig(importance="optin", faithful=False, prune_neurons=False, num_samples=32)).compute_scores(model, data)
    flat = scores.head_scores.flatten()
    adapter = get_adapter(model)
    inputs = {"input_ids": torch.stack([d["input_ids"] for d in data])}
    dense = output(model, inputs)

    def kl_without(index: int) -> float:
        mask = torch.ones(flat.numel())
        mask[index] = 0
        with apply_masks(model, adapter, head_mask=mask.view_as(scores.head_scores)):
            return kl_loss([KLOutputs.of(dense)], [KLOutputs.of(output(model, inputs))], 1.0).item()

    assert kl_without(int(flat.argmax())) > kl_without(int(flat.argmin()))


def test_compute_masks_reallocates_from_given_scores_without_data():
    model = tiny_model("bert")
    scores = ImportanceScores(torch.rand(3, 4), torch.rand(3, 48))
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, seq_len=10))
    masks = pruner.compute_masks(model, scores=scores)
    keep_more = OptinPruner(OptinConfig(mac_constraint=0.9, seq_len=10)).compute_masks(model, scores=scores)
    assert masks.head_mask.sum() + masks.neuron_mask.sum() < keep_more.head_mask.sum() + keep_more.neuron_mask.sum()


def test_save_then_from_pretrained_gives_identical_outputs(tmp_path, recwarn):
    for arch in ("bert", "vit", "bert-encoder"):
        model = tiny_model(arch, attn="sdpa")  # what a fresh load picks too
        pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12))
        pruner.prune_model(model, calibration(arch if arch != "bert-encoder" else "bert"))
        pruner.save(model, tmp_path / arch)
        assert {"optin_config.json", "optin_masks.safetensors", "model.safetensors", "config.json"} <= set(os.listdir(tmp_path / arch))
        loaded = AutoOptinModel.from_pretrained(tmp_path / arch)
        assert type(loaded) is type(model)
        assert torch.equal(output(loaded, batch(arch)), output(model, batch(arch)))
        assert OptinConfig.from_pretrained(tmp_path / arch) == pruning_result(model).config
        counted = [16, 16] if arch == "vit" else None  # the result records the calibration images' size
        assert pruning_result(model).config == dataclasses.replace(pruner.config, base_model_class=type(model).__name__, image_size=counted)
        assert torch.equal(PruningMasks.load(tmp_path / arch / "optin_masks.safetensors").head_mask, pruner.masks.head_mask)
    assert not [w for w in recwarn if "missing" in str(w.message).lower() or "unexpected" in str(w.message).lower()]


@pytest.mark.parametrize("mode", ["weights", "scales"])
def test_a_loaded_pruned_model_saves_and_loads_again_unchanged(tmp_path, mode):
    tiny_model("bert", attn="sdpa").save_pretrained(tmp_path / "base")
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")  # the base: a local folder
    config = OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct=mode)
    OptinPruner(config).prune_model(model, calibration("bert"))
    result, expected = pruning_result(model), output(model, batch("bert"))
    assert result.config.base_model_name_or_path == str(tmp_path / "base")
    save_pruned(model, tmp_path / "full")
    save_pruned(model, tmp_path / "masks", masks_only=True)
    assert not (tmp_path / "masks" / "model.safetensors").exists()
    for first in ("full", "masks"):
        loaded = AutoOptinModel.from_pretrained(tmp_path / first)
        for kind in ("full", "masks"):  # a loaded full checkpoint carries its refit weights into a masks-only one
            save_pruned(loaded, tmp_path / f"{first}-{kind}", masks_only=kind == "masks")
            again = AutoOptinModel.from_pretrained(tmp_path / f"{first}-{kind}")
            assert torch.equal(output(again, batch("bert")), expected), (first, kind)
            masks = pruning_result(again).masks
            assert torch.equal(masks.head_mask, result.masks.head_mask) and torch.equal(masks.neuron_mask, result.masks.neuron_mask)
            assert pruning_result(again).config == result.config


def test_save_and_push_refuse_a_model_the_pruner_did_not_prune(tmp_path):
    data = calibration("bert")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct="none"))
    mine = pruner.prune_model(tiny_model("bert"), data)
    with pytest.raises(ValueError, match="was not pruned by optin-hf: call OptinPruner.prune_model"):
        pruner.save(tiny_model("bert"), tmp_path / "dense")
    with pytest.raises(ValueError, match="was not pruned by optin-hf"):
        save_pruned(tiny_model("bert"), tmp_path / "dense")
    masks = pruner.masks
    same_counts = PruningMasks(masks.head_mask.roll(1, dims=1), masks.neuron_mask.roll(8, dims=1))
    assert same_counts.heads_per_layer() == masks.heads_per_layer() and same_counts.neurons_per_layer() == masks.neurons_per_layer()
    assert not torch.equal(same_counts.head_mask, masks.head_mask)
    other_units = OptinPruner(pruner.config).prune_model(tiny_model("bert", attn="sdpa"), masks=same_counts)  # as loaded
    other_counts = OptinPruner(dataclasses.replace(pruner.config, mac_constraint=0.8)).prune_model(tiny_model("bert"), data)
    assert other_counts.config.optin != mine.config.optin
    for other in (other_units, other_counts):
        with pytest.raises(ValueError, match="pruned with other masks than this pruner's"):
            pruner.save(other, tmp_path / "other")
        with pytest.raises(ValueError, match="pruned with other masks than this pruner's"):
            pruner.push_to_hub(other, "me/other")  # refused before any Hub call
    assert not (tmp_path / "dense").exists() and not (tmp_path / "other").exists()
    save_pruned(other_units, tmp_path / "other")  # the model's own result needs no pruner
    loaded = AutoOptinModel.from_pretrained(tmp_path / "other")
    assert torch.equal(pruning_result(loaded).masks.head_mask, same_counts.head_mask)
    assert torch.equal(output(loaded, batch("bert")), output(other_units, batch("bert")))


def test_failed_save_leaves_nothing_half_written(tmp_path, monkeypatch):
    model = tiny_model("bert")
    pruner = OptinPruner(OptinConfig(importance="random", seq_len=12))
    pruner.prune_model(model, calibration("bert"))

    def boom(path):
        raise OSError("disk full")

    monkeypatch.setattr(pruner.masks, "save", boom)
    with pytest.raises(OSError, match="disk full"):
        pruner.save(model, tmp_path / "out")
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("constraint", [1.5, 0])
def test_mac_constraint_outside_zero_one_is_refused(constraint):
    with pytest.raises(ValueError, match=r"outside \(0, 1\]"):
        OptinConfig(mac_constraint=constraint)


def test_empty_calibration_data_is_refused():
    with pytest.raises(ValueError, match="calibration data is empty"):
        OptinPruner().compute_scores(tiny_model("bert"), [])


def test_masks_of_another_shape_are_refused():
    with pytest.raises(ValueError, match="do not fit"):
        OptinPruner().prune_model(tiny_model("bert"), masks=PruningMasks(torch.ones(2, 4), torch.ones(2, 48)))


def test_unsupported_model_type_names_the_supported_ones():
    model = OPTModel(OPTConfig(num_hidden_layers=1, hidden_size=8, num_attention_heads=2, ffn_dim=16,
                               word_embed_proj_dim=8, vocab_size=120, max_position_embeddings=32))
    with pytest.raises(ValueError, match=r"Unsupported model_type 'opt'.*bert.*vit"):
        OptinPruner().compute_scores(model, calibration("bert"))


def test_unreachable_budget_is_refused():
    with pytest.raises(ValueError, match="cannot be reached"):
        OptinPruner(OptinConfig(mac_constraint=0.1, prune_neurons=False, importance="random")).compute_masks(
            tiny_model("bert"), calibration("bert")
        )


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("settings, kept_whole", [({}, None), ({"prune_neurons": False}, "prune_neurons"),
                                                  ({"prune_heads": False}, "prune_heads")])
@pytest.mark.parametrize("name", ["resnet", "swin", "convnext"])
def test_an_unreachable_budget_is_refused_before_scoring_naming_the_least_reachable(name, settings, kept_whole):
    """The MACs no unit owns (and those of a kind kept whole) are checked before any forward pass; the
    error names the least reachable mac_constraint, which then prunes, and advises only what would help."""
    family = FAMILIES[name]
    model = family.build()
    adapter = get_adapter(model)
    forwards = []
    model.register_forward_pre_hook(lambda module, args: forwards.append(1))
    pruner = OptinPruner(OptinConfig(**{**family.settings, **settings, "mac_constraint": 0.05}))
    with pytest.raises(ValueError) as refused:
        pruner.prune_model(model, family.examples(2, 1))
    message = str(refused.value)
    assert not forwards and pruner.scores is None
    if not adapter.supports("heads") and kept_whole == "prune_neurons":  # heads alone: refused by the declaration first
        assert message.startswith(f"prune_heads=True with prune_neurons=False prunes heads only, which the {name} adapter does not give")
        return
    assert message.startswith(f"mac_constraint=0.05 cannot be reached on this {name} model") and adapter.fixed_parts in message
    assert "both heads and neurons" not in message
    has_heads = adapter.num_heads(model.config) > 0  # ConvNeXt has none: prune_heads changes nothing
    assert (f"{kept_whole}=True" in message) == (kept_whole is not None and (has_heads or kept_whole == "prune_neurons"))
    least = float(message.split("at least ")[1].split(",")[0].rstrip("."))
    dense = count_macs(model)
    if kept_whole is None:  # what no unit owns (at the narrowest residual widths tried, where they are cut), rounded up
        fixed = adapter.fixed_macs(model)
        if pruner.config.prune_channels:
            widths = least_widths(adapter.channel_widths(model.config))
            fixed = adapter.fixed_macs_at(model.config, adapter.image_size(model.config), widths)
        assert least == math.ceil(fixed / dense * 1000) / 1000
    if least < 1:
        pruner = OptinPruner(OptinConfig(**{**family.settings, **settings, "mac_constraint": least, "importance": "random"}))
        pruner.prune_model(model, family.examples(2, 1))
        assert count_macs(model) <= least * dense


def test_an_already_pruned_model_is_refused():
    model = tiny_model("bert")
    OptinPruner(OptinConfig(importance="random")).prune_model(model, calibration("bert"))
    with pytest.raises(ValueError, match="already pruned"):
        OptinPruner().prune_model(model, calibration("bert"))


def test_saving_before_pruning_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Nothing to save"):
        OptinPruner().save(tiny_model("bert"), tmp_path / "x")
    assert not (tmp_path / "x").exists()



@pytest.mark.parametrize("arch, settings", [("bert", {}), ("llama", {"reconstruct_inputs": True, "selection": "refit"})])
def test_a_dense_copy_given_to_prune_model_is_the_refits_and_is_left_as_it_is(monkeypatch, arch, settings):
    """`dense=` spares the pruner its own copy of the model: the same slim model, bit for bit, no copy made, and
    the given copy unchanged."""
    tiny = family(arch)
    config = OptinConfig(**{**tiny.settings, "importance": "magnitude", "reconstruct": "weights", **settings})
    data = tiny.examples(4, 1)
    own, shared = tiny.build(), tiny.build()
    dense = copy.deepcopy(shared)
    before = {k: v.clone() for k, v in dense.state_dict().items()}
    OptinPruner(config).prune_model(own, data)
    copies = []
    monkeypatch.setattr(optin_hf.pruner.copy, "deepcopy", lambda x, *a: copies.append(x) or copy.deepcopy(x, *a))
    OptinPruner(config).prune_model(shared, data, dense=dense)
    assert not copies
    assert own.state_dict().keys() == shared.state_dict().keys()
    assert all(torch.equal(own.state_dict()[k], shared.state_dict()[k]) for k in own.state_dict())
    assert all(torch.equal(before[k], v) for k, v in dense.state_dict().items())


def test_a_dense_copy_that_is_not_the_models_is_refused():
    model, other = tiny_model("bert"), tiny_model("bert")
    with torch.no_grad():
        next(other.parameters()).add_(1.0)
    macs = count_macs(model, 16)
    for dense in (other, model):
        with pytest.raises(ValueError, match="dense= must be an unpruned copy"):
            OptinPruner(OptinConfig(importance="magnitude", reconstruct="weights")).prune_model(model, calibration("bert"), dense=dense)
    assert count_macs(model, 16) == macs  # nothing slimmed


@pytest.mark.parametrize("importance, steps", [("optin", 1), ("magnitude", 2)])
def test_prune_model_looks_the_adapter_up_once(monkeypatch, importance, steps):
    """The entry point finds the adapter and hands it down: every lookup (`get_adapter`, and `check_model`
    through it) checks the config once, so the checks are counted."""
    model = tiny_model("bert")
    adapter_class = type(get_adapter(model))
    lookups = []
    check = adapter_class.check_config
    monkeypatch.setattr(adapter_class, "check_config", lambda self, config: lookups.append(1) or check(self, config))
    config = OptinConfig(mac_constraint=0.6, importance=importance, reconstruct="weights", prune_steps=steps,
                         md_tokens=8, num_samples=4, batch_size=4)
    OptinPruner(config).prune_model(model, calibration("bert", n=4))
    assert len(lookups) == 1


@pytest.mark.parametrize("masks_only", [False, True])
def test_loading_a_checkpoint_looks_the_adapter_up_once(monkeypatch, tmp_path, masks_only):
    """`AutoOptinModel.from_pretrained` finds the adapter once (from the checkpoint's or the base's config) and
    hands it to slimming, the refit and the result it reads back."""
    base = tiny_model("bert")
    base.save_pretrained(tmp_path / "base")
    model = type(base).from_pretrained(tmp_path / "base")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, importance="optin", reconstruct="weights", md_tokens=8, num_samples=4,
                                     batch_size=4))
    pruner.prune_model(model, calibration("bert", n=4))
    if masks_only:
        save_pruned(model, tmp_path / "slim", masks_only=True)
    else:
        pruner.save(model, tmp_path / "slim")
    adapter_class = type(get_adapter(model))
    lookups = []
    check = adapter_class.check_config
    monkeypatch.setattr(adapter_class, "check_config", lambda self, config: lookups.append(1) or check(self, config))
    AutoOptinModel.from_pretrained(tmp_path / "slim")
    assert len(lookups) == 1
