"""Layer-streamed scoring (`optin_hf.engine.streaming`): a causal LM loaded with its decoder layers offloaded
to disk scores exactly as the same model held in memory, with at most one decoder layer materialised."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from torch import nn

from optin_hf import OptinConfig, OptinPruner
from optin_hf.arch import get_adapter
from optin_hf.engine.streaming import is_streamed, load_streamed, resident
from tiny import family, tiny_llm


def _bytes(parameters) -> int:
    """Bytes of the parameters that hold values (a parameter offloaded by accelerate sits on the meta device)."""
    return sum(p.numel() * p.element_size() for p in parameters if p.device.type != "meta")


def _saved(tmp_path: Path, name: str) -> tuple[nn.Module, Path]:
    model = tiny_llm(name)
    model.save_pretrained(tmp_path / name)
    return model, tmp_path / name


def _streamed(tmp_path: Path, folder: Path) -> nn.Module:
    model = load_streamed(folder, offload_folder=tmp_path / "offload", attn_implementation="eager")
    assert is_streamed(model)
    return model


@pytest.mark.parametrize("name", ["llama", "qwen2"])
def test_streamed_scores_and_masks_equal_the_in_memory_run(tmp_path, name):
    """Bit for bit: the offloaded weights are the stored values moved, and every operation runs on the same tensors."""
    memory, folder = _saved(tmp_path, name)
    streamed = _streamed(tmp_path, folder)
    assert _bytes(streamed.parameters()) < _bytes(memory.parameters())  # the layers are really on disk
    settings = {**family(name).settings, "allocation": "scores"}  # what the default is on an offloaded model
    examples = family(name).examples(4, 1)
    pruners = {how: OptinPruner(OptinConfig(**settings)) for how in ("memory", "streamed")}
    masks = {how: pruners[how].compute_masks(model, examples) for how, model in (("memory", memory), ("streamed", streamed))}
    for field in ("head_scores", "neuron_scores"):
        assert torch.equal(getattr(pruners["streamed"].scores, field), getattr(pruners["memory"].scores, field)), field
    assert torch.equal(masks["streamed"].head_mask, masks["memory"].head_mask)
    assert torch.equal(masks["streamed"].neuron_mask, masks["memory"].neuron_mask)
    assert not masks["memory"].neuron_mask.all()  # something was pruned: equal masks are not both full
    assert _bytes(streamed.parameters()) == _bytes([p for n, p in memory.named_parameters() if ".layers." not in n])


def test_a_memory_limit_below_the_model_gives_the_unlimited_scores(tmp_path):
    """transformers' own `device_map="auto"` under `max_memory` (what a user with too little memory writes): what
    does not fit goes to disk, the final norm included, and scoring streams it with the same scores."""
    from transformers import AutoModelForCausalLM

    memory, folder = _saved(tmp_path, "llama")
    limit = 60_000  # bytes: the tied embedding (15 kB) and about one decoder layer (31 kB) of the 108 kB model
    assert limit < _bytes(memory.parameters())
    limited = AutoModelForCausalLM.from_pretrained(folder, device_map="auto", max_memory={"cpu": limit},
                                                   offload_folder=tmp_path / "offload", attn_implementation="eager")
    assert is_streamed(limited) and _bytes(limited.parameters()) <= limit
    config = OptinConfig(**family("llama").settings)
    examples = family("llama").examples(4, 1)
    want, got = (OptinPruner(config).compute_scores(model, examples) for model in (memory, limited))
    assert torch.equal(got.head_scores, want.head_scores) and torch.equal(got.neuron_scores, want.neuron_scores)


def test_the_reference_engine_streams_too(tmp_path):
    """Its full masked forwards run through accelerate's hooks alone: the same scores, bit for bit."""
    memory, folder = _saved(tmp_path, "llama")
    streamed = _streamed(tmp_path, folder)
    config = OptinConfig(**{**family("llama").settings, "engine": "reference", "neuron_group_size": 48, "num_samples": 2})
    examples = family("llama").examples(2, 1)
    want, got = (OptinPruner(config).compute_scores(model, examples) for model in (memory, streamed))
    assert torch.equal(got.head_scores, want.head_scores) and torch.equal(got.neuron_scores, want.neuron_scores)


def test_streamed_scoring_materialises_one_decoder_layer_at_a_time(tmp_path):
    """Sampled at every module call of the scoring run (dense capture, the fast engine's pieces and later layers):
    the weights holding values never exceed what is not offloaded plus one decoder layer."""
    memory, folder = _saved(tmp_path, "llama")
    streamed = _streamed(tmp_path, folder)
    layers = get_adapter(memory).layers_of(memory)
    layer_bytes = max(_bytes(layer.parameters()) for layer in layers)
    kept = _bytes(streamed.parameters())  # embeddings, final norm, LM head (tied)
    peak = {"bytes": 0, "layers": 0}

    def sample(*_):
        peak["bytes"] = max(peak["bytes"], _bytes(streamed.parameters()))
        held = sum(_bytes(layer.parameters()) > 0 for layer in get_adapter(streamed).layers_of(streamed))
        peak["layers"] = max(peak["layers"], held)

    handles = [h for m in streamed.modules() for h in (m.register_forward_pre_hook(sample), m.register_forward_hook(sample))]
    try:
        OptinPruner(OptinConfig(**family("llama").settings)).compute_scores(streamed, family("llama").examples(4, 1))
    finally:
        for handle in handles:
            handle.remove()
    assert peak["layers"] == 1  # the engine held a layer (its pieces), and never two
    assert peak["bytes"] == kept + layer_bytes
    assert peak["bytes"] < _bytes(memory.parameters())
    assert _bytes(streamed.parameters()) == kept  # all released after scoring


def test_resident_materialises_a_layer_and_releases_it(tmp_path):
    memory, folder = _saved(tmp_path, "llama")
    streamed = _streamed(tmp_path, folder)
    layer, want = get_adapter(streamed).layers_of(streamed)[1], get_adapter(memory).layers_of(memory)[1]
    with resident(layer):
        down = layer.mlp.down_proj
        assert torch.equal(down.weight, want.mlp.down_proj.weight)
        down(torch.zeros(1, down.in_features))  # its hook leaves a resident weight in place
        assert down.weight.device.type == "cpu"
        with resident(layer):  # nested: the outer one keeps it
            pass
        assert down.weight.device.type == "cpu"
    assert all(p.device.type == "meta" for p in layer.parameters())


def test_what_streaming_cannot_run_is_refused_with_the_fix(tmp_path):
    _, folder = _saved(tmp_path, "llama")
    with pytest.raises(ValueError, match="offload_folder="):
        load_streamed(folder)  # on CPU the layers can only go to disk
    (tmp_path / "a-file").write_text("")
    with pytest.raises(OSError, match="is a file"):
        load_streamed(folder, offload_folder=tmp_path / "a-file")
    streamed = _streamed(tmp_path, folder)
    examples = family("llama").examples(4, 1)
    settings = family("llama").settings
    with pytest.raises(ValueError, match=r"compute_masks.*masks=masks"):
        OptinPruner(OptinConfig(**settings)).prune_model(streamed, examples)
    with pytest.raises(ValueError, match="importance='magnitude' reads weights"):
        OptinPruner(OptinConfig(**{**settings, "importance": "magnitude"})).compute_scores(streamed, examples)
    with pytest.raises(ValueError, match="checkpoint_dir="):
        OptinPruner(OptinConfig(**settings, checkpoint_dir=str(tmp_path / "losses"))).compute_scores(streamed, examples)
    # the fluctuation's dense pass runs the model in memory: named, it is refused; the default takes the scores there
    with pytest.raises(ValueError, match="allocation='fluctuation' is not supported with layer-streamed scoring"):
        OptinPruner(OptinConfig(**settings, allocation="fluctuation")).compute_masks(streamed, examples)
