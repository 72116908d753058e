import dataclasses

import datasets
import pytest
import torch
from tiny import batch, calibration, output, tiny_model
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils.data import DataLoader
from transformers import PreTrainedTokenizerFast

from optin_hf import OptinConfig, OptinPruner
from optin_hf.data import average_length, prepare_calibration

WORDS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "the", "cat", "sat", "on", "mat", "dog", "ran"]


@pytest.fixture(scope="module")
def tokenizer():
    """A real fast word-level tokenizer built offline (no download)."""
    backend = Tokenizer(models.WordLevel({w: i for i, w in enumerate(WORDS)}, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")


def flat(batches):
    """Per-example (ids, length) regardless of how the batches were cut."""
    out = []
    for b in batches:
        for ids, mask in zip(b["input_ids"], b["attention_mask"]):
            n = int(mask.sum())
            out.append(ids[:n].tolist())
    return out


def test_all_accepted_forms_give_the_same_examples(tokenizer):
    texts = ["the cat sat on the mat", "the dog ran", "cat", "the mat the mat the mat"]
    kwargs = dict(num_samples=10, batch_size=3, max_length=5)
    from_texts = prepare_calibration(texts, tokenizer, **kwargs)
    encoded = [{"input_ids": torch.tensor(tokenizer(t, truncation=True, max_length=5)["input_ids"])} for t in texts]
    from_dicts = prepare_calibration(encoded, **kwargs)
    from_dataset = prepare_calibration(datasets.Dataset.from_dict({"text": texts, "label": [0, 1, 0, 1]}), tokenizer, **kwargs)
    loader = DataLoader(encoded, batch_size=2, collate_fn=lambda items: {"input_ids": torch.nn.utils.rnn.pad_sequence([i["input_ids"] for i in items], batch_first=True)})
    from_loader = prepare_calibration(loader, **kwargs)
    expected = [tokenizer(t, truncation=True, max_length=5)["input_ids"] for t in texts]
    assert flat(from_texts) == flat(from_dicts) == flat(from_dataset) == expected
    assert [len(b["input_ids"]) for b in from_texts] == [3, 1]
    # A padded DataLoader without attention_mask: pad id 0 counts as a token there.
    assert [row[: len(e)] for row, e in zip(flat(from_loader), expected)] == expected


def test_num_samples_truncation_and_average_length(tokenizer):
    batches = prepare_calibration(["the cat", "the cat sat on the mat", "dog"], tokenizer, num_samples=2, batch_size=8, max_length=4)
    assert batches[0]["input_ids"].shape == (2, 4)
    assert average_length(batches) == pytest.approx((2 + 4) / 2)


def test_images_and_errors(tokenizer):
    images = [{"pixel_values": torch.randn(3, 8, 8)} for _ in range(5)]
    batches = prepare_calibration(images, num_samples=4, batch_size=3, max_length=8)
    assert [b["pixel_values"].shape[0] for b in batches] == [3, 1] and average_length(batches) is None
    with pytest.raises(ValueError, match="empty"):
        prepare_calibration([], num_samples=4, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="pass a tokenizer"):
        prepare_calibration(["the cat"], None, num_samples=4, batch_size=2, max_length=8)
    with pytest.raises(TypeError, match="not supported"):
        prepare_calibration(42, num_samples=4, batch_size=2, max_length=8)
    with pytest.raises(ValueError, match="none of the model inputs"):
        prepare_calibration([{"foo": torch.ones(3)}], num_samples=4, batch_size=2, max_length=8)


def test_labels_are_kept_only_on_request(tokenizer):
    texts, labels = ["the cat sat on the mat", "the dog ran", "cat"], [2, 0, 1]
    kwargs = dict(num_samples=10, batch_size=2, max_length=4)
    encoded = [{"input_ids": torch.tensor(tokenizer(t)["input_ids"]), "label": y} for t, y in zip(texts, labels)]
    forms = [
        datasets.Dataset.from_dict({"text": texts, "label": labels}),  # tokenized here
        datasets.Dataset.from_list([{**ex, "input_ids": ex["input_ids"].tolist()} for ex in encoded]),
        encoded,
        DataLoader(encoded, batch_size=3, collate_fn=lambda items: {"input_ids": torch.stack([i["input_ids"][:1] for i in items]), "labels": torch.tensor([i["label"] for i in items])}),
    ]
    for form in forms:
        assert all(set(b) == {"input_ids", "attention_mask"} for b in prepare_calibration(form, tokenizer, **kwargs))
        batches = prepare_calibration(form, tokenizer, labels=True, **kwargs)
        assert [b["labels"].tolist() for b in batches] == [[2, 0], [1]]
        assert batches[0]["input_ids"].shape[1] <= 4
    with pytest.raises(ValueError, match="1 of the 2 calibration examples have a label"):
        prepare_calibration([encoded[0], {"input_ids": encoded[1]["input_ids"]}], labels=True, **kwargs)
    with pytest.raises(ValueError, match="class ids in the model's order.*label2id"):
        prepare_calibration(datasets.Dataset.from_dict({"text": texts, "label": ["a", "b", "c"]}), tokenizer, labels=True, **kwargs)
    texts_only = prepare_calibration(texts, tokenizer, labels=True, **kwargs)
    assert "labels" not in texts_only[0]


def test_an_unpadded_batch_encoding_is_a_batch_of_its_examples(tokenizer):
    """A tokenizer's output without padding (ragged lists) gives the same batches as the texts."""
    texts, kwargs = ["the cat sat on the mat", "dog", "the dog ran"], dict(num_samples=8, batch_size=2, max_length=16)
    encoded = tokenizer(texts)
    assert len({len(row) for row in encoded["input_ids"]}) > 1
    from_encoding, from_texts = prepare_calibration(encoded, **kwargs), prepare_calibration(texts, tokenizer, **kwargs)
    assert [b.keys() for b in from_encoding] == [b.keys() for b in from_texts]
    assert all(torch.equal(a[k], b[k]) for a, b in zip(from_encoding, from_texts) for k in a)


def test_bool_and_float_masks_of_0_and_1_read_as_integer_masks():
    ids = [torch.arange(5, 13), torch.arange(20, 26)]
    masks = [torch.tensor([1] * 6 + [0] * 2), torch.ones(6, dtype=torch.long)]

    def batched(dtype: torch.dtype) -> dict[str, torch.Tensor]:
        data = [{"input_ids": i, "attention_mask": m.to(dtype)} for i, m in zip(ids, masks)]
        return prepare_calibration(data, num_samples=2, batch_size=2, max_length=8)[0]

    as_long = batched(torch.long)
    for dtype in (torch.bool, torch.float32):
        assert batched(dtype)["attention_mask"].dtype == torch.long and all(torch.equal(batched(dtype)[k], as_long[k]) for k in as_long)


def test_a_generator_is_read_once_so_the_refit_and_each_scoring_see_its_examples():
    """A generator was used up by the refit's read, and scoring then said "the calibration data is empty"."""
    data = calibration("bert", n=6)
    config = OptinConfig(num_samples=4, importance="magnitude", mac_constraint=0.7)
    from_list = OptinPruner(config).prune_model(tiny_model("bert"), data)
    from_generator = OptinPruner(config).prune_model(tiny_model("bert"), (ex for ex in data))
    assert torch.equal(output(from_list, batch("bert")), output(from_generator, batch("bert")))
    # prune_steps=2 reads it for the refit and for each step's scoring
    stepped = dataclasses.replace(config, prune_steps=2)
    masks = OptinPruner(stepped).compute_masks(tiny_model("bert"), iter(data))
    assert torch.equal(masks.neuron_mask, OptinPruner(stepped).compute_masks(tiny_model("bert"), data).neuron_mask)
