"""Decoder LLMs (Llama, Mistral, Qwen2, Qwen3 with grouped KV heads; GPT-2): what is their own beyond the
conformance suite (which runs geometry, MACs, slim == masked, save/reload, KL outputs, fast == reference and the
refits on every family in tiny.FAMILIES): generation with a KV cache, the GQA unit, per-token MACs, the
next-token KL outputs, and `uniform_layers` checkpoints that plain transformers loads."""

from __future__ import annotations

import copy
import dataclasses
import json

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode
from tiny import LLM_BUILDERS, TEXT_MACS_LEN, family, llm_flop_macs, tiny_llm
from transformers import AutoModelForCausalLM

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.allocate import allocate_uniform
from optin_hf.arch import check_model, get_submodule
from optin_hf.arch.causal_lm import CachedEmptyAttention
from optin_hf.capture import scoring_forward
from optin_hf.hooks import apply_masks
from optin_hf.macs import CostModel
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")

LLMS = sorted(LLM_BUILDERS)
PROMPTS = torch.randint(5, 120, (2, 6), generator=torch.Generator().manual_seed(7))


def gappy_masks(model) -> PruningMasks:
    """Layer 0 keeps no attention unit, layer 1 its second only, the last layer no MLP channel; the rest about half."""
    full = PruningMasks.full(model.config)
    g = torch.Generator().manual_seed(0)
    heads, neurons = full.head_mask.clone(), torch.rand(full.neuron_mask.shape, generator=g) > 0.5
    heads[0] = False
    heads[1, 0] = False
    neurons[:-1, 0] = True
    neurons[-1] = False
    return dataclasses.replace(full, head_mask=heads, neuron_mask=neurons)


def greedy(model, prompts: torch.Tensor = PROMPTS, tokens: int = 20) -> torch.Tensor:
    with torch.no_grad():
        return model.generate(prompts, max_new_tokens=tokens, do_sample=False, attention_mask=torch.ones_like(prompts))


@pytest.mark.parametrize("name", LLMS)
def test_slim_generates_the_masked_models_tokens_with_its_kv_cache(name):
    """Greedy generation (20 tokens, KV cache on) of the slim model equals the dense model's under the same masks,
    with a layer that keeps no attention unit and one that keeps no MLP channel; the cache holds the kept KV heads."""
    model = tiny_llm(name)
    adapter, masks = check_model(model), gappy_masks(model)
    with apply_masks(model, adapter, masks.head_mask.float(), masks.neuron_mask.float()):
        masked = greedy(model)
    assert not torch.equal(masked, greedy(model))  # the masks change what it says
    slim_model(model, masks)
    assert torch.equal(greedy(model), masked)
    assert isinstance(get_submodule(adapter.layers_of(model)[0], adapter.attn_core), CachedEmptyAttention)
    with torch.no_grad():
        cache = model(PROMPTS, use_cache=True).past_key_values
    # a unit has one key/value head (GQA: a KV group; GPT-2: a head); layer 0 holds the one-wide placeholder
    assert [layer.keys.shape[1] for layer in cache.layers] == [1, *masks.heads_per_layer()[1:]]
    assert cache.get_seq_length() == PROMPTS.shape[1]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_a_reloaded_slim_model_generates_the_same_tokens(name, tmp_path):
    model = tiny_llm(name)
    pruner = OptinPruner(OptinConfig(**{**family(name).settings, "importance": "magnitude"}))
    pruner.prune_model(model, family(name).examples(4, 1))
    pruner.save(model, tmp_path / "slim")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "slim", attn_implementation="eager")
    assert torch.equal(greedy(loaded), greedy(model))


def test_a_kv_group_owns_its_query_heads_and_its_key_and_value_head():
    """Keeping group 1 of 2 (g = 2 query heads of dh = 12 each) keeps q rows 24..47, k and v rows 12..23 and o_proj
    columns 24..47; Qwen3's per-head q_norm/k_norm (shared by all heads) stay as they were."""
    model = tiny_llm("qwen3")
    dense = copy.deepcopy(model)
    adapter = check_model(model)
    layer, before = adapter.layers_of(model)[1], adapter.layers_of(dense)[1]
    adapter.slim_heads(layer, torch.tensor([1]), model.config)
    attn, old = layer.self_attn, before.self_attn
    assert torch.equal(attn.q_proj.weight, old.q_proj.weight[24:48])
    assert torch.equal(attn.k_proj.weight, old.k_proj.weight[12:24])
    assert torch.equal(attn.v_proj.weight, old.v_proj.weight[12:24])
    assert torch.equal(attn.o_proj.weight, old.o_proj.weight[:, 24:48])
    assert torch.equal(attn.q_norm.weight, old.q_norm.weight) and torch.equal(attn.k_norm.weight, old.k_norm.weight)
    assert adapter.kept_heads(layer, model.config) == 1


def test_qwen2_biases_follow_their_rows():
    model = tiny_llm("qwen2")
    dense = copy.deepcopy(model)
    adapter = check_model(model)
    layer, old = adapter.layers_of(model)[0].self_attn, adapter.layers_of(dense)[0].self_attn
    adapter.slim_heads(adapter.layers_of(model)[0], torch.tensor([0]), model.config)
    assert torch.equal(layer.q_proj.bias, old.q_proj.bias[:16]) and torch.equal(layer.k_proj.bias, old.k_proj.bias[:8])
    assert layer.o_proj.bias is None


def test_gpt2_heads_are_cut_from_each_block_of_the_fused_qkv():
    model = tiny_llm("gpt2")
    old = copy.deepcopy(model).transformer.h[0].attn
    adapter = check_model(model)
    adapter.slim_heads(adapter.layers_of(model)[0], torch.tensor([2]), model.config)
    attn = model.transformer.h[0].attn
    columns = (torch.arange(16, 24)[None, :] + torch.tensor([0, 32, 64])[:, None]).flatten()
    assert torch.equal(attn.c_attn.weight, old.c_attn.weight[:, columns])  # Conv1D: [in, out]
    assert torch.equal(attn.c_attn.bias, old.c_attn.bias[columns])
    assert torch.equal(attn.c_proj.weight, old.c_proj.weight[16:24])
    assert attn.split_size == 8


def test_macs_are_per_token_with_the_lm_head_and_the_attention_at_the_stated_context():
    """count_macs(model, L): the LM head (d x V) once per token, and 2 L dh per query head for its scores and context,
    equal to torch's FLOP counter per token at another context than the suite's."""
    model = tiny_llm("llama")
    config = model.config
    lm_head = config.hidden_size * config.vocab_size
    assert CostModel.of(model).fixed == lm_head
    query_heads = config.num_hidden_layers * config.num_attention_heads
    assert count_macs(model, 40) - count_macs(model, 10) == 30 * 2 * query_heads * config.head_dim
    for length in (TEXT_MACS_LEN, 17):
        inputs = torch.randint(5, 100, (1, length), generator=torch.Generator().manual_seed(0))
        with FlopCounterMode(display=False) as counter, torch.no_grad():
            model(input_ids=inputs, use_cache=False)
        assert count_macs(model, length) == counter.get_total_flops() / 2 / length
    assert llm_flop_macs(model) == count_macs(model, TEXT_MACS_LEN)


def test_kl_outputs_are_the_next_token_logits_at_every_real_token():
    model = tiny_llm("mistral")
    batch = family("mistral").inputs
    with torch.no_grad():
        output = scoring_forward(model, batch)
    kl = check_model(model).kl_outputs(output, batch)
    assert torch.equal(kl.logits, output.logits)  # [examples, positions, vocabulary]
    assert torch.equal(kl.valid, batch["attention_mask"].bool())
    assert not kl.valid[1, 9:].any()


def uniform(name: str, **settings) -> tuple:
    model = tiny_llm(name)
    config = OptinConfig(**{**family(name).settings, "importance": "magnitude", "uniform_layers": True, **settings})
    pruner = OptinPruner(config)
    pruner.prune_model(model, family(name).examples(4, 1))
    return pruner, model


@pytest.mark.parametrize(("name", "settings"), [("llama", {}), ("qwen3", {}), ("qwen2", {}), ("gpt2", {"prune_heads": False, "mac_constraint": 0.8})])
def test_a_uniform_checkpoint_loads_in_plain_transformers(name, settings, tmp_path):
    """uniform_layers=True: every layer keeps the same counts, and the full checkpoint is the family's standard config,
    which AutoModelForCausalLM loads without optin-hf (identical logits); AutoOptinModel loads it too."""
    pruner, model = uniform(name, **settings)
    masks = pruner.masks
    assert len(set(masks.heads_per_layer())) == 1 and len(set(masks.neurons_per_layer())) == 1
    assert masks.neurons_per_layer()[0] < 48
    assert count_macs(model, pruner.seq_len) <= pruner.config.mac_constraint * count_macs(tiny_llm(name), pruner.seq_len)
    pruner.save(model, tmp_path / "slim")
    saved = json.loads((tmp_path / "slim" / "config.json").read_text())
    assert "transformers_weights" not in saved
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "slim", attn_implementation="eager").eval()
    batch = family(name).inputs
    with torch.no_grad():
        expected = model(**batch).logits
        assert torch.equal(plain(**batch).logits, expected)
    loaded = AutoOptinModel.from_pretrained(tmp_path / "slim", attn_implementation="eager")
    with torch.no_grad():
        assert torch.equal(loaded(**batch).logits, expected)
    assert loaded.config.optin == model.config.optin
    assert PruningMasks.full(loaded.config).head_mask.shape == masks.head_mask.shape  # its config is the dense one
    assert torch.equal(greedy(plain), greedy(model))


def test_a_per_layer_checkpoint_keeps_its_guard_against_plain_transformers(tmp_path):
    model = tiny_llm("llama")
    pruner = OptinPruner(OptinConfig(**{**family("llama").settings, "importance": "magnitude", "allocation": "scores"}))
    pruner.prune_model(model, family("llama").examples(4, 1))
    assert len(set(pruner.masks.neurons_per_layer())) > 1
    pruner.save(model, tmp_path / "slim")
    assert "transformers_weights" in json.loads((tmp_path / "slim" / "config.json").read_text())


def test_uniform_search_keeps_each_layers_best_units_at_one_count():
    """The (k, n) kept is the best that fits: every other common count either costs more than the budget or keeps
    less summed score; each layer keeps its own k best heads and n best neurons."""
    model = tiny_llm("llama")
    costs = CostModel.of(model).at([12] * 3)
    g = torch.Generator().manual_seed(3)
    heads, neurons = torch.rand(3, 2, generator=g), torch.rand(3, 48, generator=g)
    budget = 0.6 * costs.masked(PruningMasks.full(model.config))
    masks = allocate_uniform(heads, neurons, costs, budget, neurons_multiple_of=8)
    (k,), (n,) = set(masks.heads_per_layer()), set(masks.neurons_per_layer())
    assert n % 8 == 0 and costs.masked(masks) <= budget

    def kept_score(k: int, n: int) -> float:
        return float(heads.sort(1, descending=True).values[:, :k].sum() + neurons.sort(1, descending=True).values[:, :n].sum())

    for layer in range(3):
        assert set(masks.neuron_mask[layer].nonzero().flatten().tolist()) == set(neurons[layer].argsort(descending=True)[:n].tolist())
    for other_k in (1, 2):
        for other_n in range(8, 49, 8):
            if costs.macs([other_k] * 3, [other_n] * 3) <= budget and costs.macs([other_k] * 3, [other_n] * 3) >= 0.99 * budget:
                assert kept_score(other_k, other_n) <= kept_score(k, n) + 1e-12


def test_uniform_layers_refuses_what_it_cannot_give():
    model = tiny_llm("llama")
    costs = CostModel.of(model).at([12] * 3)
    scores = torch.rand(3, 2), torch.rand(3, 48)
    with pytest.raises(ValueError, match="uniform_layers=True cannot reach the budget"):
        allocate_uniform(*scores, costs, 0.1 * costs.masked(PruningMasks.full(model.config)), neurons_multiple_of=8)
    counts = torch.tensor([48, 32, 48])
    units = PruningMasks(torch.ones(3, 2, dtype=torch.bool), torch.arange(48) < counts[:, None], neuron_counts=counts)
    with pytest.raises(ValueError, match="this model's layers differ"):
        allocate_uniform(*scores, costs, 1e9, units=units)
    with pytest.raises(ValueError, match="uniform_layers=True keeps the same counts in every layer, which a token schedule"):
        OptinPruner(OptinConfig(**{**family("vit").settings, "uniform_layers": True, "prune_tokens": True,
                                   "importance": "random"})).prune_model(family("vit").build(), family("vit").examples(4, 1))


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_fast_scores_equal_reference_scores_on_examples_the_engine_could_pack(name):
    """Examples of lengths 4..19 in one batch of 16 are what the fast engine packs end to end for an encoder; a decoder's
    causal attention and rotary positions must not be packed, and its fast scores still equal the reference's."""
    tiny = family(name)
    g = torch.Generator().manual_seed(3)
    data = [{"input_ids": torch.randint(5, 120, (length,), generator=g)} for length in range(4, 20)]
    settings = {**tiny.settings, "num_samples": 16, "batch_size": 16, "importance": "optin"}
    model = tiny.build()
    scores = {engine: OptinPruner(OptinConfig(**settings, engine=engine)).compute_scores(model, data)
              for engine in ("reference", "fast")}
    for kind in ("head_scores", "neuron_scores"):
        torch.testing.assert_close(getattr(scores["fast"], kind), getattr(scores["reference"], kind), rtol=1e-4, atol=0)
