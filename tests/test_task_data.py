import ast
import argparse
from pathlib import Path

import datasets
import numpy as np
import pytest
import torch
from tiny_task import LABELS, tokenizer, write_csv
from transformers import BertConfig

from optin_hf.commands.args import add_evaluate_args, add_prune_args
from optin_hf.data import prepare_calibration
from optin_hf.tasks.names import TASKS
from optin_hf.tasks.task_data import (
    Columns,
    DataSpec,
    Encoder,
    LabelEncoder,
    calibration_rows,
    load_split,
    load_task_data,
    resolve_columns,
)


def test_csv_splits_slice_without_overlap(tmp_path):
    path = write_csv(tmp_path / "data.csv", n=40)
    spec = DataSpec(str(path), calibration_split="train[:25%]", eval_split="train[25%:]")
    data = load_task_data(spec, "text-classification")
    assert (len(data.calibration), len(data.evaluation)) == (10, 30)
    assert not set(data.calibration["text"]) & set(data.evaluation["text"])
    assert data.columns == Columns(("text",), "label")
    assert data.record == {"dataset": spec.to_dict()}


def test_saved_dataset_dict_split_and_slicing(tmp_path):
    dd = datasets.DatasetDict(
        {"train": datasets.Dataset.from_dict({"x": list(range(10))}), "validation": datasets.Dataset.from_dict({"x": [7, 8]})}
    )
    dd.save_to_disk(tmp_path / "saved")
    spec = DataSpec(str(tmp_path / "saved"))
    assert load_split(spec, "train[2:5]")["x"] == [2, 3, 4]
    assert load_split(spec, "validation")["x"] == [7, 8]
    with pytest.raises(ValueError, match="Unknown split"):
        load_split(spec, "test")


def test_bad_data_sources_get_clear_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_split(DataSpec(str(tmp_path / "missing.csv")), "train")
    (tmp_path / "data.txt").write_text("a")
    with pytest.raises(ValueError, match="not a data file"):
        load_split(DataSpec(str(tmp_path / "data.txt")), "train")
    path = write_csv(tmp_path / "data.csv", n=4)
    with pytest.raises(ValueError, match=r"Unknown split.*train\[:80%\]"):
        load_task_data(DataSpec(str(path)), "text-classification")  # eval_split defaults to validation
    with pytest.raises(ValueError, match="text_pair_column needs text_column"):
        DataSpec("x", text_pair_column="b")
    with pytest.raises(ValueError, match="Unknown dataset keys"):
        DataSpec.from_dict({"path": "x", "colums": 1})


def test_column_detection_prefers_glue_pairs():
    assert resolve_columns(["question", "sentence", "label", "idx"], "text-classification").inputs == ("question", "sentence")
    assert resolve_columns(["premise", "hypothesis", "label"], "text-classification").inputs == ("premise", "hypothesis")
    assert resolve_columns(["sentence", "label"], "text-classification").inputs == ("sentence",)
    assert resolve_columns(["image", "label"], "image-classification").inputs == ("image",)
    assert resolve_columns(["a", "b"], "text-classification", text="a", text_pair="b").inputs == ("a", "b")
    with pytest.raises(ValueError, match=r"Column\(s\) \['review'\] not in the dataset"):
        resolve_columns(["text", "label"], "text-classification", text="review")
    with pytest.raises(ValueError, match="--text-column"):
        resolve_columns(["body", "label"], "text-classification")



def test_the_cli_offers_the_tasks_the_data_code_knows():
    for add in (add_prune_args, add_evaluate_args):
        parser = argparse.ArgumentParser()
        add(parser)
        task = next(a for a in parser._actions if a.dest == "task")
        assert tuple(task.choices) == TASKS
    with pytest.raises(ValueError, match="Unknown task 'token-classification'"):
        resolve_columns(["text", "label"], "token-classification")


PAIR_DATASETS = {
    "qnli": {"question": ["red w1 w2", "w3 green"], "sentence": ["blue w4", "w5 w6 red"]},
    "mnli": {"premise": ["red w1 w2", "w3 green"], "hypothesis": ["blue w4", "w5 w6 red"]},
    "qqp": {"question1": ["red w1 w2", "w3 green"], "question2": ["blue w4", "w5 w6 red"]},
    "mrpc": {"sentence1": ["red w1 w2", "w3 green"], "sentence2": ["blue w4", "w5 w6 red"]},
}


@pytest.mark.parametrize("name", PAIR_DATASETS)
def test_calibration_reads_sentence_pairs_as_the_task_data_does(name):
    """optin_hf.data (a Dataset given to the pruner) and the CLI's Encoder read the same pair columns."""
    columns = {**PAIR_DATASETS[name], "label": [0, 1], "idx": [0, 1]}
    dataset = datasets.Dataset.from_dict(columns)
    inputs = resolve_columns(dataset.column_names, "text-classification").inputs
    assert len(inputs) == 2
    expected = Encoder("text-classification", Columns(inputs, "label"), tokenizer(), max_length=16).batch(list(dataset))
    batch = prepare_calibration(dataset, tokenizer(), num_samples=2, batch_size=2, max_length=16)[0]
    assert torch.equal(batch["input_ids"], expected["input_ids"])
    assert batch["token_type_ids"][0].tolist() == [0] * 5 + [1] * 3  # [CLS] red w1 w2 [SEP] | blue w4 [SEP]


def test_calibration_without_a_text_column_names_the_columns_it_reads():
    with pytest.raises(ValueError, match=r"text column \['text', 'sentence', 'content'\] or pair .*'premise', 'hypothesis'.*\['body', 'label'\]"):
        prepare_calibration(datasets.Dataset.from_dict({"body": ["x"], "label": [0]}), tokenizer(), num_samples=1, batch_size=1, max_length=8)


def _imports(path: Path, package: str) -> set[str]:
    """Absolute names of the modules `path` (a module of `package`) imports, relative imports resolved."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            module = ".".join([*base, node.module] if node.module else base)
            names.add(module)
            names.update(f"{module}.{alias.name}" for alias in node.names)
    return names


def test_no_core_module_imports_the_application_layer():
    """Library below, application above: only the CLI (commands/) and tasks/ itself may import optin_hf.tasks."""
    root = Path(__file__).resolve().parents[1] / "optin_hf"
    offenders = {}
    for path in sorted(root.rglob("*.py")):
        relative = path.relative_to(root.parent)
        if relative.parts[1] in ("tasks", "commands"):
            continue
        package = ".".join(relative.with_suffix("").parts[:-1]) if path.name != "__init__.py" else ".".join(relative.parts[:-1])
        bad = sorted(n for n in _imports(path, package) if n == "optin_hf.tasks" or n.startswith("optin_hf.tasks."))
        if bad:
            offenders[str(relative)] = bad
    assert offenders == {}
    # The walk sees relative imports: the workflow's own `from .names import ...` resolves into optin_hf.tasks.
    assert "optin_hf.tasks.names" in _imports(root / "tasks" / "workflow.py", "optin_hf.tasks")
    assert "optin_hf.tasks.names" in _imports(root / "commands" / "args.py", "optin_hf.commands")


def test_encoder_tokenizes_pairs_as_pairs_and_truncates():
    encoder = Encoder("text-classification", Columns(("a", "b"), "label"), tokenizer(), max_length=6)
    rows = [{"a": "red w1 w2", "b": "blue w3 w4 w5 w6"}, {"a": "green", "b": "w9"}]
    examples = encoder.examples(rows)
    assert [len(e["input_ids"]) for e in examples] == [6, 5]
    assert examples[1]["token_type_ids"].tolist() == [0, 0, 0, 1, 1]  # [CLS] green [SEP] | w9 [SEP]
    batch = encoder.batch(rows)
    assert batch["input_ids"].shape == (2, 6) and batch["attention_mask"].sum().item() == 11


def test_encoder_passes_pixel_values_through():
    encoder = Encoder("image-classification", Columns(("pixel_values",), "label"), None, max_length=8)
    batch = encoder.batch([{"pixel_values": np.ones((1, 8, 8)).tolist()}] * 3)
    assert batch["pixel_values"].shape == (3, 1, 8, 8) and batch["pixel_values"].dtype == torch.float32
    with pytest.raises(ValueError, match="needs a tokenizer or image processor"):
        Encoder("image-classification", Columns(("image",), "label"), None, max_length=8)


def test_label_encoder_matches_class_names_and_checks_ranges():
    config = BertConfig(num_labels=3, id2label={0: "blue", 1: "red", 2: "green"}, label2id={"blue": 0, "red": 1, "green": 2})
    by_name = LabelEncoder(datasets.ClassLabel(names=LABELS), config)  # dataset order red, green, blue
    assert by_name([0, 1, 2]).tolist() == [1, 2, 0]
    assert by_name(["Blue", "red"]).tolist() == [0, 1]
    generic = LabelEncoder(datasets.ClassLabel(names=["a", "b", "c"]), BertConfig(num_labels=3))
    assert generic([2, 0]).tolist() == [2, 0]
    with pytest.raises(ValueError, match="unlabeled"):
        generic([0, -1])
    with pytest.raises(ValueError, match="out of range"):
        generic([3])
    with pytest.raises(ValueError, match="not classes of the model"):
        by_name(["purple"])
    assert LabelEncoder(None, BertConfig(num_labels=1))([4.5, 1]).dtype == np.float64


def test_calibration_rows_are_a_seeded_sample():
    dataset = datasets.Dataset.from_dict({"x": list(range(100))})
    a, b = calibration_rows(dataset, 10, seed=0), calibration_rows(dataset, 10, seed=0)
    assert a == b and len(a) == 10 and [r["x"] for r in a] != list(range(10))
    assert [r["x"] for r in calibration_rows(dataset, 10, seed=1)] != [r["x"] for r in a]
    assert len(calibration_rows(dataset, 500, seed=0)) == 100
    streamed = calibration_rows(dataset.to_iterable_dataset(), 5, seed=0)
    assert len(streamed) == 5


def test_revision_and_data_dir_are_refused_for_local_data(tmp_path):
    write_csv(tmp_path / "d.csv", n=4)
    for key in ("revision", "data_dir"):
        with pytest.raises(ValueError, match="apply to Hub datasets, and .* is a local path: drop them"):
            load_split(DataSpec(path=str(tmp_path / "d.csv"), **{key: "refs/convert/parquet"}), "train")
