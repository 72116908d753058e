"""Bad input gives one clear error up front (issue 15): calibration data, scores, seq_len, masks, the CLI."""

import math

import datasets
import pytest
import tiny_task
import torch
from tiny import calibration, output, tiny_model
from torch.utils.data import DataLoader, TensorDataset

from optin_hf import ImportanceScores, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.allocate import allocate
from optin_hf.macs import MacCosts
from optin_hf.commands.__main__ import main
from optin_hf.data import prepare_calibration
from optin_hf.slim import slim_model
from optin_hf.tasks.task_data import Columns, Encoder

KW = dict(num_samples=8, batch_size=4, max_length=32)


def ids(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(5, 120, (n,), generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("masked_first", [True, False])
def test_examples_with_and_without_attention_mask_are_refused_in_either_order(masked_first):
    with_mask = {"input_ids": ids(8), "attention_mask": torch.tensor([1] * 6 + [0] * 2)}
    without = {"input_ids": ids(8, seed=1)}
    data = [with_mask, without] if masked_first else [without, with_mask]
    with pytest.raises(ValueError, match=r"example 1 has inputs .* but example 0 has .*same inputs"):
        prepare_calibration(data, **KW)


def test_an_attention_mask_shorter_than_input_ids_is_refused():
    data = [{"input_ids": ids(8), "attention_mask": torch.ones(8)}, {"input_ids": ids(8), "attention_mask": torch.ones(7)}]
    with pytest.raises(ValueError, match=r"example 1: attention_mask has shape \(7,\) but input_ids \(8,\)"):
        prepare_calibration(data, **KW)
    batch = {"input_ids": torch.stack([ids(8), ids(8, 1)]), "attention_mask": torch.ones(3, 8)}  # 2 examples, 3 masks
    with pytest.raises(ValueError, match="different numbers of examples"):
        prepare_calibration(batch, **KW)


@pytest.mark.parametrize("seq_len", [math.nan, math.inf, 0.0])
def test_a_non_finite_or_empty_seq_len_is_refused(seq_len):
    model = tiny_model("bert")
    with pytest.raises(ValueError, match=rf"seq_len={seq_len!r} is not a positive finite number"):
        count_macs(model, seq_len)
    pruner = OptinPruner(OptinConfig(reconstruct="none"))
    pruner.seq_len = seq_len
    scores = ImportanceScores(torch.rand(3, 4), torch.rand(3, 48))
    with pytest.raises(ValueError, match="not a positive finite number"):
        pruner.compute_masks(model, scores=scores)
    unit = torch.ones(3, dtype=torch.float64)
    with pytest.raises(ValueError, match="MAC counts are not finite"):
        allocate(scores.head_scores, scores.neuron_scores, MacCosts(unit * math.nan, unit), budget=10.0)


@pytest.mark.parametrize(
    "arch, data, message",
    [
        ("bert", [{"pixel_values": torch.randn(3, 16, 16)}] * 8, r"has \['pixel_values'\], but this bert model takes text, as input_ids"),
        ("vit", [{"input_ids": ids(8)}] * 8, r"has \['attention_mask', 'input_ids'\], but this vit model takes images only, as pixel_values"),
    ],
)
def test_images_to_a_text_model_and_text_to_a_vit_are_refused_up_front(arch, data, message):
    """Under the default importance="auto" too: the search checks them before the dense model runs on its held-out share."""
    with pytest.raises(ValueError, match=message):
        OptinPruner(OptinConfig(reconstruct="none", num_samples=4)).compute_scores(tiny_model(arch), data)


@pytest.mark.parametrize("item", [1, None, [5, 6, 7]])
def test_items_that_are_not_dicts_name_the_accepted_forms(item):
    with pytest.raises(TypeError, match=rf"item 0 is {type(item).__name__} .*dicts of tensors or lists.*BatchEncoding.*DataLoader"):
        prepare_calibration([item], **KW)


def test_a_tensor_dataset_loader_is_told_to_yield_dicts():
    loader = DataLoader(TensorDataset(torch.randint(5, 120, (4, 8))), batch_size=2)
    with pytest.raises(TypeError, match=r"item 0 is a list of tensors, as a TensorDataset yields.*'input_ids'.*'pixel_values'"):
        OptinPruner(OptinConfig(reconstruct="none")).compute_scores(tiny_model("bert"), loader)


def test_an_all_padding_example_is_refused_naming_it():
    data = [{"input_ids": ids(8, seed=i), "attention_mask": torch.ones(8, dtype=torch.long)} for i in range(4)]
    data[2]["attention_mask"] = torch.zeros(8, dtype=torch.long)
    with pytest.raises(ValueError, match="example 2 has no real token"):
        OptinPruner(OptinConfig(reconstruct="none", num_samples=4)).compute_scores(tiny_model("bert"), data)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_scores_are_refused_naming_the_unit(bad):
    heads, neurons = torch.rand(3, 4), torch.rand(3, 48)
    heads[1, 2] = bad
    with pytest.raises(ValueError, match="head scores hold 1 NaN/inf value.*layer 1, head 2"):
        OptinPruner(OptinConfig(seq_len=16)).compute_masks(tiny_model("bert"), scores=ImportanceScores(heads, neurons))
    heads[1, 2], neurons[2, 40] = 0.5, bad
    with pytest.raises(ValueError, match="neuron scores hold 1 NaN/inf value.*layer 2, neuron 40"):
        OptinPruner(OptinConfig(seq_len=16)).compute_masks(tiny_model("bert"), scores=ImportanceScores(heads, neurons))


def test_all_zero_scores_are_refused_as_no_information():
    scores = ImportanceScores(torch.zeros(3, 4), torch.rand(3, 48))
    with pytest.raises(ValueError, match="head scores are all zero: they carry no information"):
        OptinPruner(OptinConfig(seq_len=16)).compute_masks(tiny_model("bert"), scores=scores)
    # Heads that are not pruned need no scores.
    masks = OptinPruner(OptinConfig(seq_len=16, prune_heads=False, mac_constraint=0.9)).compute_masks(tiny_model("bert"), scores=scores)
    assert masks.head_mask.all() and not masks.neuron_mask.all()


def test_masks_given_as_a_dict_are_refused_naming_pruning_masks(tmp_path):
    model = tiny_model("bert")
    full = PruningMasks.full(model.config)
    as_dict = {"head_mask": full.head_mask, "neuron_mask": full.neuron_mask}
    with pytest.raises(TypeError, match="slim_model: masks must be a PruningMasks, not a dict"):
        slim_model(tiny_model("bert"), as_dict)
    pruner = OptinPruner(OptinConfig(reconstruct="none"))
    with pytest.raises(TypeError, match="prune_model: masks must be a PruningMasks, not a dict"):
        pruner.prune_model(model, masks=as_dict)
    pruner.prune_model(model, masks=full)
    pruner.masks = as_dict
    with pytest.raises(TypeError, match=r"OptinPruner.masks \(what save and push_to_hub write\): masks must be a PruningMasks, not a dict"):
        pruner.save(model, tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("engine", ["fast", "reference"])
def test_a_neuron_group_size_that_does_not_divide_the_ffn_prunes(engine):
    """5 does not divide 48: the last group holds 3 neurons; both engines score, allocate and slim."""
    model, data = tiny_model("bert"), calibration("bert", n=4)
    config = OptinConfig(importance="optin", neuron_group_size=5, engine=engine, num_samples=4, md_tokens=24, reconstruct="none",
                         mac_constraint=0.7)
    pruner = OptinPruner(config)
    scores = pruner.compute_scores(model, data)
    assert scores.neuron_scores.shape == (3, 48) and torch.isfinite(scores.neuron_scores).all()
    assert all(len(set(row.tolist())) == 10 for row in scores.neuron_scores)  # 9 groups of 5 and one of 3
    pruner.prune_model(model, data)
    assert output(model, {"input_ids": ids(8)[None]}).shape == (1, 3)
    assert count_macs(model, pruner.seq_len) <= 0.7 * count_macs(tiny_model("bert"), pruner.seq_len) + 1


def test_cli_user_errors_are_one_line_and_debug_shows_the_traceback(tmp_path, capsys):
    """A TypeError from a user's value (here a recipe's device) is one `error:` line, not a traceback."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("model: some/model\ndataset: {path: data.csv}\ndevice: [1]\n")
    assert main(["recipe", str(recipe)]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "device" in err[0]
    with pytest.raises((TypeError, ValueError), match="device"):
        main(["recipe", str(recipe), "--debug"])


def text_data(n: int = 4, length: int = 8) -> list[dict[str, torch.Tensor]]:
    return [{"input_ids": ids(length, seed=i), "attention_mask": torch.ones(length, dtype=torch.long)} for i in range(n)]


def scores_of(arch: str, data, tokenizer=None, **settings) -> ImportanceScores:
    return OptinPruner(OptinConfig(reconstruct="none", num_samples=4, **settings)).compute_scores(tiny_model(arch), data, tokenizer)


@pytest.mark.parametrize("value, shown", [(2, "2"), (-1, "-1"), (0.5, "0.5"), (math.nan, "nan")])
def test_an_attention_mask_other_than_0_or_1_is_refused_naming_the_example(value, shown):
    """A mask of 2s doubled the MAC length; a -1 failed inside the engine's packing."""
    data = text_data()
    data[1]["attention_mask"] = data[1]["attention_mask"].to(torch.float32)
    data[1]["attention_mask"][3] = value
    with pytest.raises(ValueError, match=rf"example 1: attention_mask holds {shown}; it must be 1 for each real token and 0 for padding"):
        scores_of("bert", data)


@pytest.mark.parametrize(
    "key, value, message",
    [
        ("input_ids", 500, r"example 2: input_ids holds 500, outside the vocabulary of this bert model \(vocab_size=120: ids 0 to 119\)"),
        ("input_ids", 120, r"example 2: input_ids holds 120, outside the vocabulary"),
        ("input_ids", -3, r"example 2: input_ids holds -3; ids are never negative"),
        ("token_type_ids", 2, r"example 2: token_type_ids holds 2, outside the token types of this bert model \(type_vocab_size=2"),
        ("token_type_ids", -1, r"example 2: token_type_ids holds -1; ids are never negative"),
    ],
)
def test_token_ids_and_types_outside_the_model_are_refused_naming_the_example(key, value, message):
    data = [{**ex, "token_type_ids": torch.zeros(8, dtype=torch.long)} for ex in text_data()]
    data[2][key][5] = value
    with pytest.raises(ValueError, match=message):
        scores_of("bert", data)


@pytest.mark.parametrize("key", ["token_type_ids", "attention_mask"])
def test_float_token_types_and_fractional_masks_are_refused(key):
    data = [{**ex, "token_type_ids": torch.zeros(8, dtype=torch.long)} for ex in text_data()]
    data[0][key] = torch.full((8,), 0.5)
    message = "token_type_ids must be integer ids" if key == "token_type_ids" else "attention_mask holds 0.5"
    with pytest.raises(ValueError, match=f"example 0: {message}"):
        scores_of("bert", data)


@pytest.mark.parametrize(
    "texts, message",
    [
        (["red w1 w2", "", "w3 w4", "blue"], r"Calibration text 1 is empty \(''\)"),
        (["red w1 w2", "w3", " \t\n", "blue"], r"Calibration text 2 is empty \(' \\t\\n'\)"),
        ([("red w1", "w2"), ("w3", "")], r"Calibration text 1 is empty \(''\)"),
        (["red w1", "\u200b"], r"Calibration text 1 \('\\u200b'\) gives no token besides the tokenizer's special ones"),
    ],
)
def test_texts_with_no_real_token_are_refused_naming_them(texts, message):
    """They were scored and refit on [CLS] [SEP] alone."""
    with pytest.raises(ValueError, match=message):
        scores_of("bert", texts, tiny_task.tokenizer())


def test_a_missing_text_in_a_dataset_or_the_cli_data_is_refused():
    dataset = datasets.Dataset.from_dict({"text": ["red w1", None, "w3"], "label": [0, 1, 2]})
    with pytest.raises(ValueError, match=r"Calibration text 1 is missing \(None: an empty csv field\?\)"):
        scores_of("bert", dataset, tiny_task.tokenizer())
    # The CLI tokenizes its dataset rows itself, with the same check.
    encoder = Encoder("text-classification", Columns(("text",), "label"), tiny_task.tokenizer(), 32)
    with pytest.raises(ValueError, match=r"A text of the dataset is empty \(''\): drop it"):
        encoder.examples([{"text": "red w1", "label": 0}, {"text": "", "label": 1}])


@pytest.mark.parametrize("arch, length, limit", [("bert", 65, 64), ("roberta", 63, 62)])
def test_examples_longer_than_the_model_positions_are_refused_naming_max_length(arch, length, limit):
    """RoBERTa numbers positions from pad_token_id + 1, so its 64 positions hold 62 tokens."""
    model = tiny_model(arch)
    message = (
        rf"example 1 has {length} tokens at max_length=128, but this {arch} model has positions for {limit}: "
        rf"truncate to at most {limit} \(--max-length {limit}, OptinConfig\(max_length={limit}\)\)"
    )
    with pytest.raises(ValueError, match=message):
        scores_of(arch, [{"input_ids": ids(8)}, {"input_ids": ids(length)}])
    # Texts tokenized here are truncated at max_length first: 100 words are 102 tokens at 128, and fit at the limit.
    texts = [" ".join(["w1"] * 100)] * 2
    with pytest.raises(ValueError, match=rf"example 0 has 102 tokens at max_length=128, but this {arch} model has positions for {limit}"):
        scores_of(arch, texts, tiny_task.tokenizer())
    batch = prepare_calibration(texts, tiny_task.tokenizer(), num_samples=2, batch_size=2, max_length=limit, config=model.config)[0]
    assert batch["input_ids"].shape == (2, limit) and output(model, batch).shape == (2, 3)


@pytest.mark.parametrize("bad", [math.nan, math.inf])
def test_non_finite_images_are_refused_before_scoring(bad):
    """They were reported only after scoring, as NaN head scores."""
    data = calibration("vit", n=4)
    data[2]["pixel_values"][1, 3, 3] = bad
    with pytest.raises(ValueError, match=r"example 2: pixel_values holds 1 NaN/inf value\(s\)"):
        scores_of("vit", data)
    data[2]["pixel_values"] = torch.zeros(3, 16, 16, dtype=torch.uint8)
    with pytest.raises(ValueError, match=r"example 2: pixel_values is torch.uint8; pass the float tensors an image processor gives"):
        scores_of("vit", data)


@pytest.mark.parametrize(
    "label, message",
    [(3, r"label 3 is not a class id of this model \(0 to 2\)\.$"), (-1, r"label -1 .*GLUE's test splits"), (1.5, "label 1.5 is not a class id")],
)
def test_labels_that_are_not_classes_of_the_model_are_refused(label, message):
    data = [{**ex, "labels": torch.tensor(1)} for ex in text_data()]
    data[3]["labels"] = torch.tensor(label)
    with pytest.raises(ValueError, match=rf"example 3: {message}"):
        scores_of("bert", data, importance="fisher")


@pytest.mark.parametrize("label", [None, {"class": 1}])
def test_a_label_that_is_not_a_number_is_refused_naming_it(label):
    data = [{"input_ids": ids(8), "labels": label}] * 4
    with pytest.raises(ValueError, match=r"Calibration labels must be class ids .*label every example, or pass none"):
        prepare_calibration(data, **KW, labels=True)  # was torch's RuntimeError "Could not infer dtype of NoneType"


@pytest.mark.parametrize("shape", [(3, 0, 0), (3, 16, 0), (0, 16, 16)])
def test_an_empty_image_is_refused_before_any_forward(shape):
    with pytest.raises(ValueError, match=rf"example 0: pixel_values of shape \({shape[0]}, {shape[1]}, {shape[2]}\) is an empty image"):
        OptinPruner(OptinConfig(reconstruct="none", num_samples=4)).compute_scores(tiny_model("vit"), [{"pixel_values": torch.zeros(shape)}] * 4)
