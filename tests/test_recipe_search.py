"""importance="auto" (optin_hf.recipe_search): candidates measured on held-out calibration examples, never on a test
split; the closest one kept; every candidate recorded; a named criterion or repair respected; a time budget obeyed."""

from __future__ import annotations

import copy
import json

import pytest
import torch
from tiny import batch, calibration, family, random_images, tiny_llm, tiny_model, tiny_segformer
from tiny_task import trained_text_model, write_csv
from transformers import BertForSequenceClassification

from optin_hf import OptinConfig, OptinPruner
from optin_hf import pruner as pruner_module
from optin_hf.arch import check_model
from optin_hf.commands.__main__ import main
from optin_hf.data import prepare_calibration
from optin_hf.hub import model_card
from optin_hf.pruner import prepare_search
from optin_hf.recipe_search import (
    RecipeSearch, add_fold, calibration_examples, candidates, choose, distance, held_out_run, paired_se, search_base,
    split_examples,
)
from optin_hf.result import pruning_result
from optin_hf.search_record import Candidate, search_record

pytestmark = pytest.mark.usefixtures("one_thread")
SETTINGS = dict(importance="auto", mac_constraint=0.5, num_samples=8, batch_size=4, neuron_group_size=16, reconstruct_samples=16)
LABELS = ["optin + weights", "magnitude + weights", "fisher + weights", "optin", "magnitude", "fisher"]
ONE_FOLD = {"folds": 1, "reprune": False}  # the kept model is the chosen candidate's copy, measured on one fold
WITH_REFIT_SELECTION = [*LABELS[:3], "optin + weights (refit selection)", "magnitude + weights (refit selection)",
                        "fisher + weights (refit selection)", *LABELS[3:]]


def ids(examples: list[dict[str, torch.Tensor]]) -> list[tuple[int, ...]]:
    """Each example's real tokens, which identify it."""
    return [tuple(ex["input_ids"][ex["attention_mask"].bool()].tolist()) if "attention_mask" in ex else tuple(ex["input_ids"].flatten().tolist())
            for ex in examples]


@pytest.fixture(scope="module")
def searched() -> tuple[torch.nn.Module, torch.nn.Module, OptinPruner, list]:
    """(dense, pruned, pruner, data): a tiny BERT pruned under importance="auto" on 16 examples, the refit's unit
    selection among the candidates."""
    dense, data = tiny_model("bert"), calibration("bert", 16)
    model = copy.deepcopy(dense)
    pruner = OptinPruner(OptinConfig(**SETTINGS, importance_options={"refit_selection": True, **ONE_FOLD}))
    pruner.prune_model(model, data)
    return dense, model, pruner, data


def split(data, fold: int = 0, **changes):
    """(fit, held) of `data` as the search splits it: fold `fold` of a quarter held out."""
    config = OptinConfig(**{**SETTINGS, **changes})
    return split_examples(calibration_examples(tiny_model("bert"), data, None, config, 0.25, 16), config, 0.25, fold)


def test_the_held_out_examples_are_a_seeded_share_apart_from_those_scored():
    data = calibration("bert", 16)
    fit, held = split(data)
    assert len(held) == 4 and len(fit) == 12 and ids(held) == ids(split(data)[1])
    assert not set(ids(fit)) & set(ids(held))
    assert sorted(ids(fit) + ids(held)) == sorted(ids(calibration("bert", 16)))
    assert ids(held) != ids(split(data, seed=1)[1])
    with pytest.raises(ValueError, match="holds out 4 calibration examples .* 4 were given: pass at least 5"):
        split(data[:4])


def test_the_folds_hold_out_disjoint_shares_that_cover_the_examples():
    data = calibration("bert", 16)
    folds = [split(data, fold) for fold in range(4)]
    helds = [set(ids(held)) for _, held in folds]
    assert all(len(held) == 4 for held in helds) and set().union(*helds) == set(ids(data))  # 4 disjoint quarters
    assert all(not set(ids(fit)) & set(ids(held)) and len(fit) == 12 for fit, held in folds)
    with pytest.raises(ValueError, match="folds=5: give 1 to 4 folds"):
        RecipeSearch(folds=5)


def test_the_search_keeps_the_candidate_closest_to_the_dense_model(searched):
    dense, model, pruner, data = searched
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == WITH_REFIT_SELECTION  # every candidate, in order, each measured
    distances = [c.distance for c in record.candidates]
    assert all(d is not None and d > 0 for d in distances) and len(set(distances)) == len(distances)
    assert record.chosen == distances.index(min(distances))
    chosen = record.candidates[record.chosen]
    assert (pruner.config.importance, pruner.config.reconstruct, pruner.config.selection) == (chosen.importance, chosen.reconstruct, chosen.selection)
    assert pruner.scores.criterion == chosen.importance
    # The model kept is the chosen candidate's: measured again on the same held-out examples, it is as far.
    (runner,), _, _ = prepare_search(dense, data, None, OptinConfig(**SETTINGS), RecipeSearch(refit_selection=True, **ONE_FOLD),
                                     "auto", OptinPruner)
    assert distance(model, runner.adapter, runner.dense)[:2] == pytest.approx((chosen.kl, chosen.md), rel=1e-6)
    assert (record.held_out_examples, record.fit_examples) == (4, 12)
    assert pruning_result(model).config.extra["recipe_search"] == pruner.config.extra["recipe_search"]


def test_the_record_is_saved_and_shown_on_the_card(searched, tmp_path):
    _, model, pruner, _ = searched
    pruner.save(model, tmp_path / "out")
    saved = json.loads((tmp_path / "out" / "optin_config.json").read_text())
    assert saved["importance"] != "auto" and [c.label for c in search_record(saved).candidates] == WITH_REFIT_SELECTION
    card = str(model_card(model, "me/x", masks_only=True, base_model=None, base_revision=None))
    chosen = search_record(saved).candidates[search_record(saved).chosen]
    assert "## How the recipe was chosen" in card and f"| {chosen.label} (chosen) | {chosen.distance:.5g} |" in card
    assert all(f"| {label}" in card for label in WITH_REFIT_SELECTION)


def labelled(n: int = 16, seed: int = 6) -> list[dict[str, torch.Tensor]]:
    """`calibration("bert", n)` with a seeded class label (of the tiny BERT's 3) on each example."""
    g = torch.Generator().manual_seed(seed)
    return [{**ex, "labels": torch.randint(0, 3, (), generator=g)} for ex in calibration("bert", n)]


def search(data: list[dict[str, torch.Tensor]], **options) -> tuple[torch.nn.Module, OptinPruner]:
    """(pruned, pruner): a tiny BERT pruned under importance="auto" (one fold) on `data`."""
    model = tiny_model("bert")
    pruner = OptinPruner(OptinConfig(**SETTINGS, importance_options={**ONE_FOLD, **options}))
    pruner.prune_model(model, data)
    return model, pruner


def test_the_held_out_loss_reads_the_held_out_labels_and_nothing_else():
    """The task loss is the dense model's cross-entropy on exactly the held-out examples' labels; relabelling every
    other calibration example leaves it as it is, relabelling one held-out example moves it, and no forward sees a label."""
    dense, data = tiny_model("bert"), labelled()
    config = OptinConfig(**SETTINGS)

    def held_out(examples):
        (runner,), _, _ = prepare_search(dense, examples, None, config, RecipeSearch(), "auto", OptinPruner)
        return runner.dense

    measured = held_out(data)
    _, held = split(data)
    assert torch.cat(measured.labels).tolist() == [int(ex["labels"]) for ex in held]
    assert all("labels" not in batch for batch in measured.batches)
    with torch.no_grad():
        logits = torch.cat([dense(input_ids=ex["input_ids"]).logits for ex in held])  # each a batch of one
    expected = torch.nn.functional.cross_entropy(logits, torch.cat([ex["labels"] for ex in held])).item()
    assert measured.loss == pytest.approx(expected, rel=1e-5)
    held_ids = set(ids(held))
    others = [{**ex, "labels": (ex["labels"] + 1) % 3} if ids([ex])[0] not in held_ids else ex for ex in data]
    assert held_out(others).loss == measured.loss
    first = next(i for i, ex in enumerate(data) if ids([ex])[0] in held_ids)
    one = [{**ex, "labels": (ex["labels"] + 1) % 3} if i == first else ex for i, ex in enumerate(data)]
    assert held_out(one).loss != pytest.approx(measured.loss)


def test_the_held_out_loss_is_the_heads_task_loss_or_none():
    """A segmenter's held-out loss is its per-pixel cross-entropy against the label maps (logits upsampled to them),
    each image weighing the same; a regressor and a language model's per-token logits have none: no label is kept."""
    segmenter, g = tiny_segformer(), torch.Generator().manual_seed(0)
    images = [{**ex, "labels": torch.randint(0, 4, (32, 32), generator=g)} for ex in random_images(6, 0)]
    batches = prepare_calibration(images, num_samples=6, batch_size=3, max_length=64, labels=True)
    measured = held_out_run(segmenter, check_model(segmenter), batches, OptinConfig())
    with torch.no_grad():
        logits = segmenter(pixel_values=torch.stack([ex["pixel_values"] for ex in images])).logits
    logits = torch.nn.functional.interpolate(logits, size=(32, 32), mode="bilinear", align_corners=False)
    expected = torch.nn.functional.cross_entropy(logits, torch.stack([ex["labels"] for ex in images])).item()
    assert measured.loss == pytest.approx(expected, rel=1e-5)
    config = copy.deepcopy(tiny_model("bert").config)
    config.num_labels = 1
    regressor = BertForSequenceClassification(config).eval()
    scores = [{**ex, "labels": torch.tensor(0.5)} for ex in calibration("bert", 6)]
    batches = prepare_calibration(scores, num_samples=6, batch_size=3, max_length=64, labels=True)
    measured = held_out_run(regressor, check_model(regressor), batches, OptinConfig())
    assert measured.loss is None and measured.labels is None  # a squared error in the labels' units: no tolerance fits
    llm = tiny_llm("llama")
    texts = [{"input_ids": torch.randint(5, 100, (12,), generator=g), "labels": torch.tensor(1)} for _ in range(6)]
    batches = prepare_calibration(texts, num_samples=6, batch_size=3, max_length=64, labels=True)
    measured = held_out_run(llm, check_model(llm), batches, OptinConfig())
    assert measured.loss is None and measured.labels is None


def test_without_labels_the_distance_ranks_whatever_rank_is_asked(searched):
    _, _, pruner, _ = searched
    record = search_record(pruner.config.to_dict())
    assert record.rank == "distance" and all(c.loss is None for c in record.candidates)
    model = tiny_model("bert")
    asked = OptinPruner(OptinConfig(**SETTINGS, importance_options={"rank": "loss", **ONE_FOLD}))
    asked.prune_model(model, calibration("bert", 16))
    record = search_record(asked.config.to_dict())
    assert record.rank == "distance" and all(c.loss is None for c in record.candidates)
    assert record.chosen == min(range(len(record.candidates)), key=lambda i: record.candidates[i].distance)
    assert "the smallest held-out distance (KL + MD)" in record.lines()[0]


def test_the_held_out_loss_screens_the_candidates_the_distance_ranks():
    """On labelled data the default rank keeps the closest candidate among those whose held-out loss is within 0.02 of
    the lowest: here neither the closest candidate (rank="distance") nor the one of lowest loss (rank="loss"). The kept
    model is that candidate's copy (made before the one of lowest loss), and the record, report and card say why."""
    dense, data = tiny_model("bert"), labelled()
    model, pruner = search(data)
    record = search_record(pruner.config.to_dict())
    losses, distances = [c.loss for c in record.candidates], [c.distance for c in record.candidates]
    assert (record.rank, record.tolerance) == ("screened", 0.02) and None not in losses
    near = [i for i, loss in enumerate(losses) if loss <= min(losses) + 0.02]
    assert record.chosen == min(near, key=distances.__getitem__)
    assert record.chosen != distances.index(min(distances)) and record.chosen != losses.index(min(losses))
    assert record.chosen < losses.index(min(losses))  # its copy was kept while a lower loss was measured after it
    chosen = record.candidates[record.chosen]
    assert (pruner.config.importance, pruner.config.reconstruct) == (chosen.importance, chosen.reconstruct)
    (runner,), _, _ = prepare_search(dense, data, None, OptinConfig(**SETTINGS), RecipeSearch(**ONE_FOLD), "auto", OptinPruner)
    kl, md, each = distance(model, runner.adapter, runner.dense)
    assert (kl, md, float(each.mean())) == pytest.approx((chosen.kl, chosen.md, chosen.loss), rel=1e-6)
    assert "among the candidates whose task loss on the held-out labels is within 0.02 of the lowest" in record.lines()[0]
    assert f"held-out loss {chosen.loss:.5g}" in record.lines()[1 + record.chosen]
    card = str(model_card(model, "me/x", masks_only=True, base_model=None, base_revision=None))
    assert "| recipe | held-out distance | KL | MD | held-out loss |" in card and f" {chosen.loss:.5g} |" in card
    for rank, expected in (("loss", losses.index(min(losses))), ("distance", distances.index(min(distances)))):
        other = search_record(search(data, rank=rank)[1].config.to_dict())
        assert other.rank == rank and other.chosen == expected and [c.loss for c in other.candidates] == pytest.approx(losses)
    with pytest.raises(ValueError, match="rank='accuracy': give one of 'screened', 'distance', 'loss'"):
        RecipeSearch(rank="accuracy")


@pytest.mark.parametrize("labels", [False, True])
def test_a_named_criterion_is_used_as_named(labels):
    model, data = tiny_model("bert"), labelled() if labels else calibration("bert", 16)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "importance": "magnitude"}))
    pruner.prune_model(model, data)
    assert pruner.scores.criterion == "magnitude" and pruner.config.importance == "magnitude"
    assert "recipe_search" not in pruner.config.extra and "search_s" not in pruner.timings
    named = OptinPruner(OptinConfig(**{**SETTINGS, "importance": "magnitude"}))
    assert torch.equal(named.compute_masks(tiny_model("bert"), data).neuron_mask, pruner.masks.neuron_mask)


def test_a_named_repair_limits_the_search_to_it():
    model, data = tiny_model("bert"), calibration("bert", 16)
    pruner = OptinPruner(OptinConfig(**SETTINGS, reconstruct="none"))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == ["optin", "magnitude", "fisher"] and pruner.config.reconstruct == "none"


RESNET_LABELS = ["optin + weights", "magnitude + batchnorm", "fisher + batchnorm", "optin", "magnitude", "fisher"]


@pytest.mark.parametrize(("model_type", "labels"), [
    ("resnet", [*RESNET_LABELS[:3], "optin + weights (refit selection)", "magnitude + weights (refit selection)",
                "fisher + weights (refit selection)", *RESNET_LABELS[3:]]),
    ("bert", WITH_REFIT_SELECTION),
])
def test_each_candidate_takes_the_repair_its_own_pruner_resolves(model_type, labels):
    """Under reconstruct="auto" a candidate's repair is what naming its criterion and selection resolves to: on a
    ResNet OPTIN cuts the residual channels by default and is refit, Magnitude and Fisher keep the widths and take the
    BatchNorm repair, the refit's unit choice (which keeps the widths) takes the refit; a text model's are all the
    refit, as before."""
    tiny = family(model_type)
    model, data = tiny.build(), tiny.examples(8, 1)
    base = search_base(OptinConfig(mac_constraint=0.6))
    tried = candidates(base, check_model(model), model.config, "auto", refit_selection=True)
    assert [c.label for c in tried] == labels
    for candidate in [c for c in tried if c.reconstruct != "none"]:
        sizes = {k: v for k, v in tiny.settings.items() if k in ("num_samples", "batch_size", "neuron_group_size")}
        named = OptinPruner(OptinConfig(**sizes, mac_constraint=0.6, importance=candidate.importance, selection=candidate.selection))
        named.prune_model(copy.deepcopy(model), data)
        assert named.config.reconstruct == candidate.reconstruct == named.reconstruction.mode, candidate.label


def test_a_resnets_default_search_refits_the_optin_candidate_that_cuts_its_channels(tmp_path):
    """`OptinConfig(mac_constraint=0.6)` on a ResNet: the record names each candidate's repair, and the OPTIN
    candidate (the first: a time budget of 0 keeps it) cuts the residual channels and is refit with "weights", which
    the kept model, its saved config and its card say."""
    tiny = family("resnet")
    model = tiny.build()
    widths = check_model(model).channel_widths(model.config)
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, importance_options={"max_search_time": 0.0}))
    pruner.prune_model(model, tiny.examples(16, 1))
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == RESNET_LABELS and record.chosen == 0
    assert pruner.config.prune_channels and pruner.config.reconstruct == "weights" == pruner.reconstruction.mode
    assert sum(check_model(model).kept_channels(model)) < sum(widths)  # residual channels were cut
    pruner.save(model, tmp_path / "out")
    assert json.loads((tmp_path / "out" / "optin_config.json").read_text())["reconstruct"] == "weights"
    card = str(model_card(model, "me/x", masks_only=True, base_model=None, base_revision=None))
    assert all(f"| {label}" in card for label in RESNET_LABELS)


def test_a_named_repair_is_every_candidates_on_a_resnet():
    """reconstruct="batchnorm" named: OPTIN's candidate cuts the channels and is repaired as named, not refit."""
    tiny = family("resnet")
    model = tiny.build()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, reconstruct="batchnorm"))
    pruner.prune_model(model, tiny.examples(16, 1))
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == ["optin + batchnorm", "magnitude + batchnorm", "fisher + batchnorm"]
    assert pruner.config.reconstruct == "batchnorm" == pruner.reconstruction.mode


@pytest.mark.parametrize("importance", ["optin", "auto"])
def test_a_refit_allocation_on_a_resnet_resolves_auto_to_the_refit(importance):
    """allocation='refit' counts units by the loss the refit leaves, so reconstruct="auto" on a ResNet (whose first
    repair, "batchnorm", runs no refit) resolves to "weights", named criterion or searched; it was refused, naming a
    reconstruct='batchnorm' the user never set."""
    tiny = family("resnet")
    model = tiny.build()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, importance=importance, allocation="refit",
                                     importance_options={"max_search_time": 0.0} if importance == "auto" else {}))
    pruner.prune_model(model, tiny.examples(16, 1))
    assert pruner.config.allocation == "refit" and pruner.config.reconstruct == "weights" == pruner.reconstruction.mode
    if importance == "auto":
        assert [c.label for c in search_record(pruner.config.to_dict()).candidates] == [
            "optin + weights", "magnitude + weights", "fisher + weights"]


def test_a_time_budget_of_zero_measures_the_first_candidate_only():
    model, data = tiny_model("bert"), calibration("bert", 16)
    pruner = OptinPruner(OptinConfig(**SETTINGS, importance_options={"max_search_time": 0.0}))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    assert record.chosen == 0 and record.candidates[0].distance is not None
    assert len(record.candidates) == len(LABELS) and all(c.distance is None for c in record.candidates[1:])
    assert all(c.skipped == "not tried: max_search_time=0 s had passed" for c in record.candidates[1:])
    assert (pruner.config.importance, pruner.config.reconstruct) == ("optin", "weights")


def test_auto_checks_its_options():
    with pytest.raises(ValueError, match="importance='auto' has no setting 'held_ou'"):
        OptinConfig(**SETTINGS, importance_options={"held_ou": 0.5})
    with pytest.raises(ValueError, match=r"held_out=1.5: the share .* must be in \(0, 1\)"):
        OptinPruner(OptinConfig(**SETTINGS, importance_options={"held_out": 1.5})).prune_model(tiny_model("bert"), calibration("bert", 16))


def test_the_cli_never_holds_out_a_test_example(tmp_path, monkeypatch, capsys):
    """The CLI hands the pruner its calibration split only: the held-out examples are among those rows, none is an
    evaluation row, and the report names the recipe chosen."""
    trained_text_model(tmp_path / "model")
    write_csv(tmp_path / "data.csv", n=40, label_names=True)
    seen = {"held": []}

    def spy(*args, **kwargs):
        seen["fit"], held = split_examples(*args, **kwargs)
        seen["held"] += held
        return seen["fit"], held

    monkeypatch.setattr(pruner_module, "split_examples", spy)  # where the search splits
    out = tmp_path / "out"
    args = ["prune", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.csv"), "--calibration-split",
            "train[:20]", "--eval-split", "train[20:]", "--num-samples", "8", "--importance", "auto", "--mac-constraint",
            "0.5", "--neuron-group-size", "16", "--output", str(out)]
    assert main(args) == 0, capsys.readouterr().err
    assert "importance='auto' chose" in capsys.readouterr().out
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "model")
    import datasets

    rows = datasets.load_dataset("csv", data_files=str(tmp_path / "data.csv"), split="train")
    encode = lambda texts: {tuple(tokenizer(t, truncation=True, max_length=128)["input_ids"]) for t in texts}  # noqa: E731
    calibration_rows, test_rows = encode(rows["text"][:20]), encode(rows["text"][20:])
    held = set(ids(seen["held"]))  # every fold's that the search measured on
    assert len(held) == len(seen["held"]) and len(held) % 5 == 0 and held <= calibration_rows and not held & test_rows
    assert "labels" in seen["fit"][0]  # Fisher, a candidate, reads the calibration labels
    report = json.loads((out / "optin_report.json").read_text())
    assert report["optin"]["extra"]["recipe_search"]["held_out_examples"] == 5
    # the labels the CLI passes reach the held-out measure: every candidate has a held-out loss
    assert all(c["loss"] is not None for c in report["optin"]["extra"]["recipe_search"]["candidates"])


def test_the_kept_config_states_how_many_examples_the_refit_saw(searched):
    _, pruned, pruner, _ = searched
    record = pruner.config.extra["recipe_search"]
    assert record["fit_examples"] < SETTINGS["reconstruct_samples"]  # 16 given, a quarter held out
    assert pruner.config.reconstruct_samples == pruning_result(pruned).config.reconstruct_samples == record["fit_examples"]


def test_folds_average_the_distance_and_reprune_keeps_the_named_recipe_on_every_example():
    """With 2 folds each candidate's distance is the mean of its two folds'; re-pruned, the kept model is the chosen
    recipe named and run on all 16 calibration examples (the held-out ones too), and the config says it saw 16."""
    dense, data = tiny_model("bert"), calibration("bert", 16)
    model = copy.deepcopy(dense)
    pruner = OptinPruner(OptinConfig(**SETTINGS, importance_options={"folds": 2, "reprune": True}))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    assert record.folds == 2 and record.kept_examples == 16 and pruner.config.reconstruct_samples == 16
    assert all(len(c.folds) == 2 and c.distance == pytest.approx(c.folds[0] / 2 + c.folds[1] / 2) for c in record.candidates)
    assert all(c.folds[0] != c.folds[1] for c in record.candidates)  # two held-out shares, two measurements
    assert "2 disjoint folds of 4 held-out" in record.lines()[0] and "on all 16 calibration examples" in record.lines()[0]
    chosen = record.candidates[record.chosen]
    assert chosen.distance == min(c.distance for c in record.candidates)
    named = copy.deepcopy(dense)
    settings = {**SETTINGS, "importance": chosen.importance, "reconstruct": chosen.reconstruct}
    examples = calibration_examples(dense, data, None, OptinConfig(**settings), 0.25, 16)
    OptinPruner(OptinConfig(**settings)).prune_model(named, examples)
    inputs = batch("bert")
    with torch.no_grad():
        assert torch.allclose(model(**inputs).logits, named(**inputs).logits, atol=1e-6)


def test_a_refit_allocation_is_kept_and_rules_out_the_bare_candidates():
    """allocation='refit' counts units by the loss the refit leaves: every candidate keeps it, so none goes without
    the repair, and the scoring (which runs no repair) is not refused for it."""
    model, data = tiny_model("bert"), calibration("bert", 8)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "num_samples": 4}, allocation="refit", importance_options=ONE_FOLD))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == LABELS[:3] and all(c.distance is not None for c in record.candidates)
    assert pruner.config.allocation == "refit" and pruner.config.reconstruct == "weights"


def test_a_fluctuation_allocation_and_its_band_are_kept_by_every_candidate():
    """allocation='fluctuation' with its own band: the scoring runs without it (its band reset with it, or the
    scorer's config would be refused) and every candidate, so the kept model, allocates with it. It runs no refit,
    so the bare candidates are tried too."""
    model, data = tiny_model("bert"), calibration("bert", 8)
    pruner = OptinPruner(OptinConfig(**{**SETTINGS, "num_samples": 4}, allocation="fluctuation", allocation_band=0.05,
                                     importance_options=ONE_FOLD))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    assert [c.label for c in record.candidates] == LABELS and all(c.distance is not None for c in record.candidates)
    assert (pruner.config.allocation, pruner.config.allocation_band) == ("fluctuation", 0.05)
    assert pruner.timings["allocation_s"] > 0


def measured(label: str, losses: list[float], distance: float, folds: int = 1) -> Candidate:
    """A candidate as measured on `folds` folds: its per-example held-out `losses` (all folds') and mean `distance`."""
    importance, _, repair = label.partition(" + ")
    return Candidate(importance, repair or "none", kl=distance, md=0.0, distance=distance, loss=sum(losses) / len(losses),
                     losses=losses, folds=[distance] * folds if folds > 1 else None)


def test_a_loss_difference_within_its_standard_error_does_not_decide():
    """Screened by one paired standard error, a candidate 0.03 nats behind the lowest loss stays in where the examples
    disagree on the order (the closest of those kept), and is out where every example agrees; a fixed tolerance of
    0.02 nats (the previous default) cannot tell the two cases apart."""
    g = torch.Generator().manual_seed(0)
    base = (0.5 + torch.rand(64, generator=g)).tolist()
    noise = (torch.randn(64, generator=g) * 0.4).tolist()
    lowest = measured("optin + weights", base, 0.010)
    noisy = measured("fisher + weights", [b + 0.03 + e for b, e in zip(base, noise)], 0.004)  # order decided by noise
    steady = measured("magnitude + weights", [b + 0.03 for b in base], 0.002)  # every example 0.03 worse
    tried = [lowest, noisy, steady]
    assert choose(tried, "screened", 0.0, 1.0) == 1  # the steady one is out though closest; the noisy one is in
    assert steady.loss_se == pytest.approx(0.0, abs=1e-12) and noisy.loss_se == pytest.approx(0.4 / 8, rel=0.25)
    assert paired_se(noisy.losses, lowest.losses) == pytest.approx(float(torch.tensor(noise, dtype=torch.float64).std()) / 8, rel=1e-9)
    assert choose(tried, "screened", 0.02, 0.0) == 0  # a fixed tolerance: both out
    assert choose(tried, "screened", 0.04, 0.0) == 2  # or both in, and the steady one (closest) kept
    assert choose(tried, "loss", 0.0, 1.0) == 0 and choose(tried, "distance", 0.0, 1.0) == 2


def test_folds_add_up_per_example_and_only_candidates_measured_on_the_most_folds_are_compared():
    """A fold more averages kl, md, distance and loss, and runs the losses on; a candidate left out of a later fold
    (out of contention) is no longer chosen, even where its one-fold figures would win."""
    one = measured("optin + weights", [1.0, 2.0], 0.3)
    add_fold(one, measured("optin + weights", [3.0, 4.0], 0.1))
    assert (one.distance, one.loss, one.losses, one.folds) == (pytest.approx(0.2), 2.5, [1.0, 2.0, 3.0, 4.0], [0.3, 0.1])
    dropped = measured("optin", [0.1, 0.2], 0.001)  # closest and lowest, but measured on the first fold only
    assert choose([one, dropped], "screened", 0.0, 1.0) == 0 and choose([one, dropped], "distance", 0.0, 1.0) == 0


def test_later_folds_measure_the_candidates_in_contention_and_keep_the_first_folds_copy():
    """On labelled data with 4 folds every candidate is measured on the first fold, a later one only while it is within
    two standard errors of the lowest loss (each measured on a prefix of the folds), the choice is made among those
    measured on the most folds, and the kept model is the chosen candidate's first-fold copy; the record says how many
    folds each had. The held-out examples of every fold are calibration examples."""
    dense, data = tiny_model("bert"), labelled(32)
    model = copy.deepcopy(dense)
    pruner = OptinPruner(OptinConfig(**SETTINGS, importance_options={"folds": 4, "loss_tolerance": 0.0, "standard_errors": 1.0}))
    pruner.prune_model(model, data)
    record = search_record(pruner.config.to_dict())
    counts = [len(c.folds) if c.folds else 1 for c in record.candidates]
    assert record.folds == max(counts) > 1 and min(counts) == 1  # the bare candidates fell out after the first fold
    assert all(c.distance == pytest.approx(sum(c.folds) / len(c.folds)) for c in record.candidates if c.folds)
    assert counts[record.chosen] == record.folds
    chosen = record.candidates[record.chosen]
    runners, _, _ = prepare_search(dense, data, None, OptinConfig(**SETTINGS), RecipeSearch(folds=4), "auto", OptinPruner)
    kl, md, _ = distance(model, runners[0].adapter, runners[0].dense)
    assert kl + md == pytest.approx(chosen.folds[0], rel=1e-6)  # the first fold's copy was kept
    assert f"optin + weights {counts[0]} folds" in record.lines()[0] and "1 standard error of the lowest" in record.lines()[0]
    assert "losses" not in pruner.config.extra["recipe_search"]["candidates"][0]  # per-example losses are not saved
    calibration_ids = set(ids(data))
    assert all(set(ids(split(data, fold)[1])) <= calibration_ids for fold in range(4))
