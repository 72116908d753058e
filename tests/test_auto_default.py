"""importance="auto" is OptinConfig's default (issue 25): each entry point runs with the default settings. Under it
`compute_masks` and `compute_scores` run the recipe search on a copy of the model and give the chosen recipe's masks
and scores, so pruning with them prunes as `prune_model` does; the pruner's config, and so the saved one, names the
criterion chosen; an offloaded (layer-streamed) model, which cannot have pruned copies, is scored by OPTIN."""

from __future__ import annotations

import copy

import pytest
import torch
from test_streaming import _saved, _streamed
from tiny import calibration, family, tiny_model
from transformers import BertConfig, BertForSequenceClassification

from optin_hf import OptinConfig, OptinPruner
from optin_hf.commands.args import build_parser
from optin_hf.commands.jobs import optin_config
from optin_hf.criteria import AUTO_IMPORTANCE
from optin_hf.recipe_search import SEARCHED_CRITERIA
from optin_hf.result import pruning_result
from optin_hf.search_record import search_record

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(mac_constraint=0.5, num_samples=8, batch_size=4, neuron_group_size=16, reconstruct_samples=16)  # no importance


@pytest.fixture(scope="module")
def searched() -> tuple[torch.nn.Module, torch.nn.Module, OptinPruner, list]:
    """(dense, pruned, pruner, data): a tiny BERT pruned by `prune_model` with the default importance."""
    dense, data = tiny_model("bert"), calibration("bert", 16)
    model, pruner = copy.deepcopy(dense), OptinPruner(OptinConfig(**SETTINGS))
    pruner.prune_model(model, data)
    return dense, model, pruner, data


def same_masks(a, b) -> bool:
    return torch.equal(a.head_mask, b.head_mask) and torch.equal(a.neuron_mask, b.neuron_mask)


def measured(pruner: OptinPruner) -> list[tuple[str, float | None]]:
    """Each candidate the pruner's search tried, with its held-out distance."""
    return [(c.label, c.distance) for c in search_record(pruner.config.to_dict()).candidates]


def test_the_default_searches_and_the_saved_config_names_the_recipe_chosen(searched, tmp_path):
    assert OptinConfig().importance == AUTO_IMPORTANCE
    _, model, pruner, _ = searched
    record = search_record(pruner.config.to_dict())
    chosen = record.candidates[record.chosen]
    assert len(record.candidates) == 2 * len(SEARCHED_CRITERIA)  # each criterion with the refit, and without a repair
    assert (pruner.config.importance, pruner.config.reconstruct) == (chosen.importance, chosen.reconstruct)
    pruner.save(model, tmp_path / "slim")
    saved = OptinConfig.from_pretrained(tmp_path / "slim")
    assert saved.importance == chosen.importance != AUTO_IMPORTANCE and saved.reconstruct == chosen.reconstruct
    assert search_record(saved.to_dict()).to_dict() == record.to_dict()


def test_compute_masks_gives_the_masks_prune_model_applies_and_leaves_the_model_dense(searched):
    dense, pruned, searched_pruner, data = searched
    model, pruner = copy.deepcopy(dense), OptinPruner(OptinConfig(**SETTINGS))
    masks = pruner.compute_masks(model, data)
    assert same_masks(masks, searched_pruner.masks) and not masks.neuron_mask.all()  # the masks prune_model applied
    assert getattr(model.config, "optin", None) is None  # the search pruned a copy
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), dense.state_dict().values(), strict=True))
    for name in ("importance", "reconstruct", "selection", "reconstruct_samples"):  # the chosen recipe, as prune_model's
        assert getattr(pruner.config, name) == getattr(searched_pruner.config, name), name
    pruner.prune_model(model, data, masks=masks)
    result = pruning_result(model)
    assert same_masks(result.masks, pruning_result(pruned).masks)
    assert result.config.importance == searched_pruner.config.importance and "recipe_search" in result.config.extra


def test_compute_scores_gives_the_chosen_criterions_scores(searched):
    """The scores the kept candidate was allocated from: allocated again, they give its masks."""
    dense, _, searched_pruner, data = searched
    pruner = OptinPruner(OptinConfig(**SETTINGS))
    scores = pruner.compute_scores(dense, data)
    assert measured(pruner) == measured(searched_pruner)  # the same search
    assert scores.criterion == searched_pruner.config.importance == pruner.config.importance
    assert same_masks(pruner.compute_masks(dense, scores=scores), searched_pruner.masks)


def test_an_offloaded_model_is_scored_by_optin_under_the_default(tmp_path):
    """Its copies cannot be pruned in memory, so there is no search: OPTIN, which streams, scores it, and the config
    says so; prune_model still names the two-step recipe."""
    memory, folder = _saved(tmp_path, "llama")
    streamed, examples = _streamed(tmp_path, folder), family("llama").examples(4, 1)
    settings = {k: v for k, v in family("llama").settings.items() if k != "importance"}
    pruner = OptinPruner(OptinConfig(**settings, importance=AUTO_IMPORTANCE))
    masks = pruner.compute_masks(streamed, examples)
    assert pruner.config.importance == "optin" and pruner.scores.criterion == "optin"
    assert pruner.config.allocation == "scores"  # the fluctuation's dense pass needs the model in memory
    named = OptinPruner(OptinConfig(**settings, importance="optin", allocation="scores")).compute_masks(memory, examples)
    assert same_masks(masks, named)
    with pytest.raises(ValueError, match=r"compute_masks.*masks=masks"):
        OptinPruner(OptinConfig(**settings, importance=AUTO_IMPORTANCE)).prune_model(streamed, examples)


def test_a_regressor_without_labels_records_fisher_as_skipped():
    """Fisher cannot score a regressor against its own predictions: the default prunes with the other criteria and
    the record says why Fisher was not measured."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(vocab_size=120, max_position_embeddings=64, num_labels=1, hidden_size=32,
                                                     num_hidden_layers=2, num_attention_heads=4, intermediate_size=48)).eval()
    pruner = OptinPruner(OptinConfig(**SETTINGS))
    pruner.prune_model(model, calibration("bert", 16))
    record = search_record(pruner.config.to_dict())
    fisher = [c for c in record.candidates if c.importance == "fisher"]
    assert fisher and all(c.distance is None and c.skipped.startswith("failed: ") for c in fisher)
    assert pruner.config.importance in set(SEARCHED_CRITERIA) - {"fisher"}


def test_token_mode_searches_the_criteria_that_score_tokens():
    """prune_tokens=True under the default: only OPTIN of the searched criteria scores tokens, so only its recipes
    are candidates, and the kept model merges tokens."""
    vit = family("vit")
    model = vit.build()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, prune_tokens=True, num_samples=4, batch_size=4, neuron_group_size=16))
    pruner.prune_model(model, vit.examples(8, 1))
    assert [label for label, _ in measured(pruner)] == ["optin + weights", "optin"]
    assert pruner.config.importance == "optin" and pruner.masks.token_schedule is not None


def test_the_cli_prunes_a_model_with_the_default_and_its_help_says_so(capsys):
    """`prune --model` with no --importance prunes with OptinConfig's default, which its help names."""
    parser = build_parser("optin-hf")
    with pytest.raises(SystemExit):
        parser.parse_args(["prune", "--help"])
    assert f"(default: {AUTO_IMPORTANCE};" in " ".join(capsys.readouterr().out.split())
    args = parser.parse_args(["prune", "--model", "m", "--dataset", "d.csv", "--num-samples", "8"])
    assert optin_config(args).importance == AUTO_IMPORTANCE
