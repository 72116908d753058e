"""Every shipped recipe parses, and its data preparation (the real code) runs on tiny local stand-ins.

Only the two loaders that need the network are replaced: `datasets.load_dataset` returns tiny
in-memory datasets with the real GLUE / ImageNet columns, and `workflow.load_model` a tiny
model with the task's label count. Split choice, columns, pair tokenization, image processing
and label handling are the recipes' real path.
"""

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import datasets
import numpy as np
import PIL.Image
import pytest
import torch
import yaml
from tiny import tiny_mask2former, tiny_model, tiny_segformer
from tiny_task import stand_in_defaults, tokenizer, trained_text_model, write_csv
from transformers import Mask2FormerImageProcessorPil, SegformerImageProcessorPil, ViTImageProcessor

from optin_hf import OptinConfig, count_macs
from optin_hf.tasks import workflow
from optin_hf.commands.__main__ import main
from optin_hf.tasks.report import class_maps, predicted_logits
from optin_hf.tasks.defaults import DEFAULT_NAMES
from optin_hf.tasks.recipes import DEFAULT_RECIPES, RECIPES_DIR, default_recipe, load_recipe, parse_recipe
from optin_hf.tasks.task_data import Columns, Encoder, calibration_rows, eval_rows, label_encoder

REPO = Path(__file__).resolve().parents[1]
RECIPES = sorted((REPO / "recipes").glob("*.yaml"))
# The language-model recipes (perplexity, other budgets): tests/test_llm_task.py checks them on their own stand-ins.
LLM_RECIPES = {"smollm2-shakespeare", "llama-3.1-8b-wikitext2-128", "llama-3.1-8b-wikitext2-2048",
               "qwen2.5-7b-wikitext2-128", "qwen2.5-7b-wikitext2-2048"}
ADE20K = {
    "segformer-b0-ade20k": "nvidia/segformer-b0-finetuned-ade-512-512",
    "mask2former-swin-tiny-ade20k": "facebook/mask2former-swin-tiny-ade-semantic",
}
# scene_parse_150 (now zhoubolei/scene_parse_150) ships a loading script, which datasets >= 4 refuses: only its
# parquet export loads, one folder per configuration.
ADE20K_HUB = ("zhoubolei/scene_parse_150", {"revision": "refs/convert/parquet", "data_dir": "scene_parsing"})
ADE20K_SPLITS = ("train", "validation", "test")
IMAGENET = {
    "deit-tiny-imagenet": "facebook/deit-tiny-patch16-224",
    "deit-small-imagenet": "facebook/deit-small-patch16-224",
    "deit-base-imagenet": "facebook/deit-base-patch16-224",
    "swin-tiny-imagenet": "microsoft/swin-tiny-patch4-window7-224",
    "resnet-50-imagenet": "microsoft/resnet-50",
    "convnext-tiny-imagenet": "facebook/convnext-tiny-224",
}
# (first text, second text, class names or None for regression), as on the Hub's nyu-mll/glue.
GLUE = {
    "mnli": ("premise", "hypothesis", ["entailment", "neutral", "contradiction"]),
    "qqp": ("question1", "question2", ["not_duplicate", "duplicate"]),
    "qnli": ("question", "sentence", ["entailment", "not_entailment"]),
    "sst2": ("sentence", None, ["negative", "positive"]),
    "stsb": ("sentence1", "sentence2", None),
    "mrpc": ("sentence1", "sentence2", ["not_equivalent", "equivalent"]),
}
GLUE_DEV_LENGTHS = {"mnli": 39.05, "qqp": 30.55, "qnli": 50.97, "sst2": 25.16, "stsb": 31.47, "mrpc": 53.24}  # the method note
GLUE_SPLITS = ("train", "validation", "test", "validation_matched", "validation_mismatched", "test_matched", "test_mismatched")


def fake_glue(config: str, split: str) -> datasets.Dataset:
    first, second, names = GLUE[config]
    g = np.random.default_rng(len(split))
    text = lambda: " ".join(f"w{i}" for i in g.integers(0, 100, g.integers(3, 9)))  # noqa: E731
    n = 12
    columns = {first: [text() for _ in range(n)], **({second: [text() for _ in range(n)]} if second else {})}
    if names is None:
        features = {"label": datasets.Value("float32")}
        columns["label"] = g.uniform(0, 5, n).tolist()
    else:
        features = {"label": datasets.ClassLabel(names=names)}
        columns["label"] = [-1] * n if split.startswith("test") else g.integers(0, len(names), n).tolist()
    columns["idx"] = list(range(n))
    features = datasets.Features({**{c: datasets.Value("string") for c in (first, second) if c}, **features, "idx": datasets.Value("int32")})
    return datasets.Dataset.from_dict(columns, features=features)


def fake_imagenet(split: str) -> datasets.Dataset:
    g = np.random.default_rng(0)
    images = [PIL.Image.fromarray(g.integers(0, 255, (20, 24, 3), dtype=np.uint8)) for _ in range(5)]
    images.append(PIL.Image.fromarray(g.integers(0, 255, (20, 20), dtype=np.uint8)))  # ImageNet has grayscale images too
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(num_classes=5)})
    return datasets.Dataset.from_dict({"image": images, "label": [0, 1, 2, 3, 4, 0]}, features=features)


def fake_ade20k(split: str) -> datasets.Dataset:
    """scene_parse_150's scene_parsing columns: RGB (and some grayscale) scenes, `annotation` maps of ids 0..150
    (0 = other objects), `scene_category`."""
    g = np.random.default_rng(len(split))
    images = [PIL.Image.fromarray(g.integers(0, 255, (30, 40, 3), dtype=np.uint8)) for _ in range(4)]
    images.append(PIL.Image.fromarray(g.integers(0, 255, (36, 28), dtype=np.uint8)))
    annotations = [PIL.Image.fromarray(g.integers(0, 151, image.size[::-1], dtype=np.uint8)) for image in images]
    features = datasets.Features(
        {"image": datasets.Image(), "annotation": datasets.Image(), "scene_category": datasets.ClassLabel(num_classes=3)}
    )
    return datasets.Dataset.from_dict({"image": images, "annotation": annotations, "scene_category": [0, 1, 2, 0, 1]}, features=features)


@pytest.fixture
def stand_ins(monkeypatch, tmp_path):
    """Replace the network loaders; record what the recipes asked them for."""
    calls = {"datasets": [], "models": [], "defaults": []}

    def load_dataset(path, name=None, split=None, streaming=False, revision=None, data_dir=None, **kwargs):
        calls["datasets"].append((path, name, split, streaming))
        if "scene_parse_150" in path:
            if (path, {"revision": revision, "data_dir": data_dir}) != ADE20K_HUB:
                raise RuntimeError("Dataset scripts are no longer supported, but found scene_parse_150.py")
            if split not in ADE20K_SPLITS:
                raise ValueError(f"Unknown split {split!r}")
            dataset = fake_ade20k(split)
        elif split not in GLUE_SPLITS:
            raise ValueError(f"Unknown split {split!r}")
        else:
            dataset = fake_glue(name, split) if path == "nyu-mll/glue" else fake_imagenet(split)
        return dataset.to_iterable_dataset() if streaming else dataset

    def load_model(name, task=None, processor=None):
        calls["models"].append((name, task))
        # ADE20K's checkpoints: 150 classes; SegFormer's processor reduces labels, Mask2Former's does not (and pads
        # to a multiple of 32, as its real 384x384).
        if task == "semantic-segmentation" and "segformer" in name:
            return tiny_segformer(num_labels=150), SegformerImageProcessorPil(size={"height": 32, "width": 32}, do_reduce_labels=True), task
        if task == "semantic-segmentation":
            processor = Mask2FormerImageProcessorPil(size={"height": 64, "width": 64}, do_reduce_labels=False, ignore_index=255)
            return tiny_mask2former(num_labels=150), processor, task
        if task == "image-classification":
            return tiny_model("vit"), ViTImageProcessor(size={"height": 16, "width": 16}), task
        names = GLUE[name.rsplit("-", 1)[-1]][2]
        model = tiny_model("bert")
        num_labels = 1 if names is None else len(names)  # as the task's checkpoint: glue/mrpc's F1 needs two
        if num_labels != model.config.num_labels:
            model.config.num_labels = num_labels
            model.classifier = torch.nn.Linear(32, num_labels)
        return model, tokenizer(), task or "text-classification"

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(workflow, "load_model", load_model)
    trained_text_model(tmp_path / "text-default", steps=1)
    monkeypatch.setitem(sys.modules, "optin_hf.tasks.defaults", stand_in_defaults(tmp_path / "text-default", calls["defaults"]))
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    return calls


def test_the_expected_recipes_ship():
    names = {p.stem for p in RECIPES}
    assert {"minilm-bbc-news", "minilm-tweet-sentiment", "vit-digits"} <= names
    assert {f"bert-base-{t}" for t in GLUE} | set(IMAGENET) | set(ADE20K) <= names


def test_every_default_is_pruned_by_a_shipped_recipe_that_names_it():
    assert tuple(DEFAULT_RECIPES) == DEFAULT_NAMES
    assert RECIPES_DIR.resolve() == (REPO / "recipes").resolve()  # the package reads the top-level folder itself
    assert [default_recipe(name).default for name in DEFAULT_NAMES] == list(DEFAULT_NAMES)
    with pytest.raises(ValueError, match=r"Unknown embedded default 'cifar'; choose one of \['bbc-news'"):
        default_recipe("cifar")


def test_the_wheel_ships_the_recipes(tmp_path):
    """A wheel install has no repository around it: the defaults' settings must travel inside the package."""
    source = tmp_path / "source"
    source.mkdir()
    for name in ("setup.cfg", "pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for name in ("optin_hf", "optimum", "recipes"):
        shutil.copytree(REPO / name, source / name, symlinks=True, ignore=shutil.ignore_patterns("__pycache__"))
    build = "from setuptools import build_meta; print(build_meta.build_wheel(%r))" % str(tmp_path / "dist")
    result = subprocess.run([sys.executable, "-c", build], cwd=source, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    with zipfile.ZipFile(tmp_path / "dist" / result.stdout.split()[-1]) as wheel:
        shipped = {name: wheel.read(name) for name in wheel.namelist() if name.endswith(".yaml")}
    assert shipped == {f"optin_hf/recipes/{path.name}": path.read_bytes() for path in RECIPES}


@pytest.mark.parametrize("path", [p for p in RECIPES if p.stem not in LLM_RECIPES], ids=lambda p: p.stem)
def test_recipe_parses_and_prepares_its_data(path, stand_ins):
    job = load_recipe(path)
    # The embedded text and ViT defaults choose their recipe by held-out distance; the others name OPTIN.
    searched = path.stem in ("minilm-bbc-news", "minilm-tweet-sentiment", "vit-digits")
    assert job.optin.mac_constraint == 0.6 and job.optin.importance == ("auto" if searched else "optin")
    loaded, metric = workflow.load_job(job)
    data, model = loaded.data, loaded.model
    encoder = Encoder(data.task, data.columns, loaded.processor, job.optin.max_length)
    calibration = encoder.examples(calibration_rows(data.calibration, job.optin.num_samples, job.optin.seed))
    rows = list(eval_rows(data.evaluation, 4))
    labels = label_encoder(data, model.config, loaded.processor)([row[data.columns.label] for row in rows])
    logits = predicted_logits(model, encoder.batch(rows))
    if metric.per_pixel:
        predictions = class_maps(logits, labels)
    else:
        predictions = (logits[:, 0] if metric.regression else logits.argmax(-1)).numpy()
    assert metric.main in metric.compute(predictions, labels)

    if job.default:
        assert stand_ins["defaults"] == [job.default] and not stand_ins["datasets"]
        assert job.output == Path(f"{job.default}-optin-0.6")
    elif data.task == "text-classification":
        config = job.data.config
        first, second, names = GLUE[config]
        assert job.model.endswith(f"bert-base-uncased-{config}") and job.metric == f"glue/{config}"
        assert job.optin.seq_len == GLUE_DEV_LENGTHS[config] and job.optin.num_samples == 128
        eval_split = "validation_matched" if config == "mnli" else "validation"
        assert stand_ins["datasets"] == [("nyu-mll/glue", config, "train", False), ("nyu-mll/glue", config, eval_split, False)]
        assert data.columns.inputs == ((first, second) if second else (first,))
        paired = [bool(ex["token_type_ids"].any()) for ex in calibration]
        assert all(paired) if second else not any(paired)  # pairs are tokenized as pairs
        assert labels.dtype == (np.float64 if names is None else np.int64)
        assert len(calibration) == 12  # every row of the tiny train split (num_samples is larger)
    elif data.task == "semantic-segmentation":
        assert job.model == ADE20K[path.stem] and stand_ins["models"] == [(job.model, "semantic-segmentation")]
        assert job.metric == "mean_iou" and job.optin.reconstruct == "none" and job.output == Path(f"{path.stem}-optin-0.6")
        hub = ADE20K_HUB[0]
        assert stand_ins["datasets"] == [(hub, None, "train", False), (hub, None, "validation", False)]
        assert data.columns == Columns(("image",), "annotation")
        raw = [np.asarray(row["annotation"], dtype=np.int64) for row in rows]
        for mask, ids in zip(labels, raw):  # 0 (other objects) ignored, annotation k is the checkpoint's class k - 1
            assert np.array_equal(mask, np.where(ids == 0, 255, ids - 1))
        size = loaded.processor.size["height"]
        assert {tuple(ex["pixel_values"].shape) for ex in calibration} == {(3, size, size)}
        assert count_macs(model) > 0
    else:
        assert job.model == IMAGENET[path.stem] and stand_ins["models"] == [(job.model, "image-classification")]
        assert job.data.path == "ILSVRC/imagenet-1k" and job.metric == "accuracy"
        assert [c[3] for c in stand_ins["datasets"]] == [True, True]  # streamed: no 140 GB download
        assert [c[2] for c in stand_ins["datasets"]] == ["train", "validation"]
        assert {tuple(ex["pixel_values"].shape) for ex in calibration} == {(3, 16, 16)}
        assert count_macs(model) > 0  # vision MACs need no seq_len: 197 tokens for DeiT at 224 px


def test_a_local_recipe_runs_end_to_end(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained_text_model(tmp_path / "model")
    write_csv(tmp_path / "data.csv", n=40)
    recipe = {
        "model": str(tmp_path / "model"),
        "dataset": {"path": str(tmp_path / "data.csv"), "calibration_split": "train[:16]", "eval_split": "train[16:]"},
        "optin": {"mac_constraint": 0.7, "importance": "random", "num_samples": 8, "seed": 3},
        "output": str(tmp_path / "ignored"),
    }
    (tmp_path / "r.yaml").write_text(yaml.safe_dump(recipe))
    assert main(["recipe", str(tmp_path / "r.yaml"), "--output", str(tmp_path / "out")]) == 0
    assert not (tmp_path / "ignored").exists()
    saved = OptinConfig.from_pretrained(tmp_path / "out")
    assert (saved.mac_constraint, saved.importance, saved.num_samples, saved.seed) == (0.7, "random", 8, 3)
    assert "on 24 examples" in capsys.readouterr().out


@pytest.mark.parametrize(
    "values, message",
    [
        ({"model": "m", "dataset": {"path": "d"}, "optin": {"mac_constraint": 0.6}, "outptu": "x"}, r"unknown keys \['outptu'\]"),
        ({"model": "m", "dataset": {"path": "d", "split": "train"}}, r"Unknown dataset keys \['split'\]"),
        ({"model": "m", "dataset": {"path": "d"}, "optin": {"mac": 0.6}}, r"Unknown OptinConfig keys \['mac'\]"),
        ({"model": "m", "dataset": {"path": "d"}, "optin": {"mac_constraint": 2}}, r"outside \(0, 1\]"),
        ({"model": "m"}, "needs calibration data"),
        ({"optin": {}}, "name a model"),
        ({"default": "bbc-news", "dataset": {"path": "d"}}, "brings its own data"),
        ({"model": "m", "dataset": ["d"]}, "dataset must be a mapping"),
        (["model"], "must be a mapping"),
    ],
)
def test_recipe_errors_name_the_problem(values, message):
    with pytest.raises(ValueError, match=message):
        parse_recipe(values, "r.yaml")


def test_broken_yaml_is_a_clear_error(tmp_path):
    (tmp_path / "bad.yaml").write_text("model: [unclosed\n")
    with pytest.raises(ValueError, match="is not valid YAML"):
        load_recipe(tmp_path / "bad.yaml")


MODEL = {"model": "m", "dataset": {"path": "d"}}


@pytest.mark.parametrize(
    "values, message",
    [
        ({**MODEL, "push_to_hub": "me/x", "push_full": "false"}, r"push_full='false' is a str; expected a bool .* unquoted"),
        ({**MODEL, "model": ["model"]}, r"model=\['model'\] is a list; expected a string or None"),
        ({"default": True}, r"default=True is a bool; expected a string or None"),
        ({"default": "bbc-news", "output": 5}, r"output=5 is an int; expected a path \(a non-empty string\) or None"),
        ({"default": "bbc-news", "output": ""}, r"output='' is an empty path"),
        ({**MODEL, "task": 3}, r"task=3 is an int; expected a string or None"),
        ({**MODEL, "processor": {"name": "p"}}, r"processor=\{'name': 'p'\} is a dict; expected a string or None"),
        ({**MODEL, "metric": ["accuracy"]}, r"metric=\['accuracy'\] is a list; expected a string or None"),
        ({"default": "bbc-news", "device": 0}, r"device=0 is an int; expected a string or None"),
        ({"default": "bbc-news", "push_to_hub": 1}, r"push_to_hub=1 is an int; expected a string or None"),
        ({"default": "bbc-news", "push_to_hub": ""}, r"push_to_hub='' is empty"),
        ({**MODEL, "model": ""}, r"model='' is empty"),
        ({"default": "bbc-news", "optin": 0.6}, r"optin must be a mapping of keys to values, not float"),
        ({**MODEL, "dataset": {"path": "d", "streaming": "false"}}, r"dataset: streaming='false' is a str; expected a bool"),
        ({**MODEL, "dataset": {"path": ["d"]}}, r"dataset: path=\['d'\] is a list; expected a string"),
        ({**MODEL, "dataset": {"path": "d", "max_eval_samples": "10"}}, r"dataset: max_eval_samples='10' is a str; expected an integer"),
        ({**MODEL, "dataset": {"path": "d", "reduce_labels": 1}}, r"dataset: reduce_labels=1 is an int; expected a bool"),
        ({**MODEL, "optin": {"checkpoint_dir": ""}}, r"optin: checkpoint_dir='' is an empty path"),
    ],
)
def test_every_recipe_key_is_type_checked(values, message):
    """A wrong type is named with its key, value and the type expected, never read as truthy or crashing later."""
    with pytest.raises(ValueError, match="^r.yaml: " + message):
        parse_recipe(values, "r.yaml")


def test_quoted_and_unquoted_bools_in_a_recipe(tmp_path):
    (tmp_path / "r.yaml").write_text("default: bbc-news\npush_to_hub: me/x\npush_full: false\noptin:\ndataset:\n")
    job = load_recipe(tmp_path / "r.yaml")
    assert job.push_full is False and job.optin == OptinConfig() and job.data is None  # an empty section is no section
    (tmp_path / "r.yaml").write_text('default: bbc-news\npush_to_hub: me/x\npush_full: "false"\n')
    with pytest.raises(ValueError, match=r"push_full='false' is a str; expected a bool"):
        load_recipe(tmp_path / "r.yaml")


@pytest.mark.parametrize(
    "text, message",
    [
        ("default: bbc-news\npush_to_hub: me/x\npush_full: false\noutput: out\npush_full: true\n",
         r"r.yaml: key 'push_full' is given twice, on lines 3 and 5: keep one."),
        ("default: bbc-news\noptin:\n  mac_constraint: 0.5\n  seed: 1\n  mac_constraint: 0.9\n",
         r"r.yaml: key 'mac_constraint' is given twice, on lines 3 and 5"),
        ("model: m\ndataset: {path: d, streaming: true, streaming: false}\n", r"key 'streaming' is given twice, on lines 2 and 2"),
    ],
)
def test_a_key_given_twice_is_refused(tmp_path, text, message):
    (tmp_path / "r.yaml").write_text(text)
    with pytest.raises(ValueError, match=message):
        load_recipe(tmp_path / "r.yaml")


def test_a_recipe_sets_a_registered_criterions_own_settings(monkeypatch, tmp_path):
    """`optin: {importance_options: ...}` reaches the criterion; a mistyped one names the recipe, the criterion and the key."""
    from test_importance import LayerTiltImportance

    from optin_hf.criteria import CRITERIA, register_criterion

    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))
    register_criterion("tilt", LayerTiltImportance)
    (tmp_path / "r.yaml").write_text("model: m\ndataset: {path: d}\noptin:\n  importance: tilt\n  importance_options: {tilt: 2}\n")
    assert load_recipe(tmp_path / "r.yaml").optin.importance_options == {"tilt": 2.0}
    with pytest.raises(ValueError, match=r"^r.yaml: optin: importance_options of importance='tilt': tilt='2' is a str"):
        parse_recipe({**MODEL, "optin": {"importance": "tilt", "importance_options": {"tilt": "2"}}}, "r.yaml")
