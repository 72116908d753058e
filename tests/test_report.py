import copy
import json

import datasets
import numpy as np
import pytest
import torch
from tiny_task import sentences, trained_text_model

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.tasks.metrics import load_metric
from optin_hf.tasks import report as report_module
from optin_hf.tasks.report import REPORT_JSON, REPORT_PNG, format_si, measure
from optin_hf.tasks.task_data import Encoder, LabelEncoder, TaskData, resolve_columns


@pytest.fixture(scope="module")
def pruned(tmp_path_factory):
    """A trained tiny classifier, its 50%-MAC slim copy, and the task data both are measured on."""
    model, tok = trained_text_model(tmp_path_factory.mktemp("model"))
    rows = sentences(80, seed=7)
    dataset = datasets.Dataset.from_dict({"text": [t for t, _ in rows], "label": [y for _, y in rows]})
    data = TaskData("text-classification", dataset, dataset.select(range(40, 80)), resolve_columns(dataset.column_names, "text-classification"), {"default": "x"})
    encoder = Encoder(data.task, data.columns, tok, max_length=32)
    dense = copy.deepcopy(model)
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="magnitude"))
    pruner.prune_model(model, encoder.examples(list(dataset.select(range(16)))))
    return dense, model, pruner, data, encoder


def accuracy(model, encoder, data):
    rows = list(data.evaluation)
    with torch.no_grad():
        predictions = model(**encoder.batch(rows)).logits.argmax(-1)
    return float((predictions == torch.tensor([r["label"] for r in rows])).float().mean())


def test_measure_reports_what_the_models_do(pruned, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense, slim, pruner, data, encoder = pruned
    report = measure(
        {"dense": dense, "pruned": slim},
        name="tiny",
        data=data,
        encoder=encoder,
        labels=LabelEncoder(data.evaluation.features["label"], dense.config),
        metric=load_metric("accuracy"),
        seq_len=pruner.seq_len,
        optin=pruner.config.to_dict(),
        timings={"total_s": 1.5},
        runs=2,
    )
    d, p = report.stats["dense"], report.stats["pruned"]
    assert d.metrics["accuracy"] == pytest.approx(accuracy(dense, encoder, data)) and d.metrics["accuracy"] > 0.9
    assert p.metrics["accuracy"] == pytest.approx(accuracy(slim, encoder, data))
    assert report.eval_samples == 40
    assert d.macs == count_macs(dense, pruner.seq_len) and p.macs == count_macs(slim, pruner.seq_len)
    assert report.ratios()["macs"] == pytest.approx(0.5, abs=0.01)
    assert p.parameters == sum(t.numel() for t in slim.parameters()) < d.parameters
    assert p.heads_per_layer == pruner.masks.heads_per_layer() and p.neurons_per_layer == pruner.masks.neurons_per_layer()
    assert d.heads_per_layer == [4, 4, 4] and report.num_heads == 4 and report.intermediate_size == 48
    assert report.ratios()["speedup"] == pytest.approx(d.latency_s / p.latency_s)
    assert p.throughput == pytest.approx(32 / p.latency_s)
    assert report.ratios()["accuracy_drop"] == pytest.approx(d.metrics["accuracy"] - p.metrics["accuracy"])

    table = report.table()
    assert f"{100 * p.metrics['accuracy']:.2f}" in table and f"{report.ratios()['macs']:.3f}" in table
    assert f"heads kept per layer, pruned (of 4): {' '.join(map(str, p.heads_per_layer))}" in table
    assert "local (offline mode)" in table and "total 1.5 s" in table


def test_report_saves_json_and_a_png(pruned, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    dense, slim, pruner, data, encoder = pruned
    report = measure({"dense": dense, "pruned": slim}, name="tiny", data=data, encoder=encoder,
                     labels=LabelEncoder(None, dense.config), metric=load_metric("accuracy"), seq_len=pruner.seq_len, runs=1)
    report.save(tmp_path)
    saved = json.loads((tmp_path / REPORT_JSON).read_text())
    assert saved["stats"]["pruned"]["neurons_per_layer"] == pruner.masks.neurons_per_layer()
    assert saved["ratios"]["macs"] == pytest.approx(report.ratios()["macs"])
    assert saved["data"] == {"default": "x"} and saved["latency"]["batch_size"] == 32
    png = (tmp_path / REPORT_PNG).read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 20_000


def test_single_model_report_has_no_ratio_column_and_no_png(pruned, tmp_path):
    dense, _, _, data, encoder = pruned
    report = measure({"dense": dense}, name="tiny", data=data, encoder=encoder, labels=None, metric=load_metric("accuracy"), seq_len=12, runs=1)
    assert report.ratios() is None and report.stats["dense"].metrics is None
    assert "pruned vs dense" not in report.table() and "MACs at 12.00 tokens" in report.table()
    report.save(tmp_path)
    assert (tmp_path / REPORT_JSON).is_file() and not (tmp_path / REPORT_PNG).exists()


def test_regression_models_are_scored_on_their_single_output(pruned, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    _, _, _, data, encoder = pruned
    from tiny import tiny_model

    model = tiny_model("bert")
    model.config.num_labels = 1
    model.classifier = torch.nn.Linear(32, 1)
    scores = np.linspace(0, 5, len(data.evaluation))
    evaluation = data.evaluation.remove_columns("label").add_column("label", scores.tolist())
    stsb = TaskData(data.task, None, evaluation, data.columns, {})
    report = measure({"dense": model}, name="r", data=stsb, encoder=encoder, labels=LabelEncoder(None, model.config),
                     metric=load_metric("glue/stsb"), runs=1)
    with torch.no_grad():
        predicted = model(**encoder.batch(list(evaluation))).logits[:, 0].numpy()
    assert report.stats["dense"].metrics["pearson"] == pytest.approx(np.corrcoef(predicted, scores)[0, 1], abs=1e-6)
    assert report.seq_len == pytest.approx(float(encoder.batch(list(evaluation))["attention_mask"].sum(-1).float().mean()))


def test_measure_takes_known_metrics_instead_of_evaluating_again(pruned, monkeypatch):
    dense, slim, pruner, data, encoder = pruned
    evaluated = []
    real = report_module.evaluate_model
    monkeypatch.setattr(report_module, "evaluate_model", lambda model, *args: evaluated.append(model) or real(model, *args))
    report = measure({"dense": dense, "pruned": slim}, name="tiny", data=data, encoder=encoder,
                     labels=LabelEncoder(None, dense.config), metric=load_metric("accuracy", offline=True),
                     seq_len=pruner.seq_len, runs=1, known_metrics={"dense": {"accuracy": 0.123}})
    assert evaluated == [slim]
    assert report.stats["dense"].metrics == {"accuracy": 0.123}
    assert report.stats["pruned"].metrics["accuracy"] == pytest.approx(accuracy(slim, encoder, data))
    assert report.eval_samples == 40


def test_accuracy_of_an_in_memory_split(pruned):
    dense, slim, _, data, encoder = pruned
    split = data.evaluation
    assert report_module.split_accuracy(dense, split, encoder.processor, max_length=32) == pytest.approx(accuracy(dense, encoder, data))
    first = TaskData(data.task, None, split.select(range(7)), data.columns, {})
    capped = report_module.split_accuracy(slim, split, encoder.processor, max_length=32, max_examples=7)
    assert capped == pytest.approx(accuracy(slim, encoder, first)) and capped * 7 == pytest.approx(round(capped * 7))
    assert report_module.split_accuracy(dense, split.remove_columns("label"), encoder.processor) is None
    assert report_module.split_accuracy(dense, None, encoder.processor) is None


def test_accuracy_of_images_is_argmax_accuracy():
    from tiny import tiny_model

    model = tiny_model("vit")
    pixels = torch.randn(9, 3, 16, 16, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        predicted = model(pixel_values=pixels).logits.argmax(-1)
    labels = [int(p) if i % 3 else (int(p) + 1) % 5 for i, p in enumerate(predicted)]  # every third one wrong
    split = datasets.Dataset.from_dict({"pixel_values": pixels.numpy().tolist(), "label": labels})
    assert report_module.split_accuracy(model, split, None) == pytest.approx(6 / 9)


def test_format_si():
    assert [format_si(v) for v in (1.234e9, 5.6e6, 7_890, 12, -3.2e6)] == ["1.23 G", "5.60 M", "7.89 k", "12", "-3.20 M"]


def test_the_plot_shows_each_layers_own_dense_width():
    """Layers of different widths (CNN stages, Swin): the grey bars and the titles count each
    layer's dense units, not the widest layer's; a family without heads gets no heads panel."""
    from optin_hf.tasks.report import ModelStats, Report

    stats = {
        "dense": ModelStats({"accuracy": 0.9}, 100.0, 10, 1.0, 1.0, [0, 0], [24, 48]),
        "pruned": ModelStats({"accuracy": 0.8}, 60.0, 6, 0.7, 1.4, [0, 0], [12, 16]),
    }
    report = Report("m", "image-classification", "accuracy", "local", "accuracy", 64.0, 10, {"batch_size": 32},
                    stats, num_heads=0, intermediate_size=48, unit_names=("heads", "MLP channels"))
    heads_ax, neurons_ax, _ = report.figure().axes
    assert not heads_ax.axison and "no heads" in heads_ax.texts[0].get_text()
    assert [p.get_height() for p in neurons_ax.patches[:2]] == [24, 48]
    assert neurons_ax.get_title() == "MLP channels: 28 of 72 kept"
