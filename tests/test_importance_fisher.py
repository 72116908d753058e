import pytest
import torch
import torch.nn.functional as F
from tiny import BLOCK, FAMILIES, TEXT, calibration, tiny_model
from tiny_task import MARKERS, WORDS, trained_text_model, write_csv
from transformers import BertConfig, BertForSequenceClassification

from optin_hf import OptinConfig, OptinPruner, count_macs
from optin_hf.arch import get_adapter
from optin_hf.hooks import apply_masks
from optin_hf.importance.fisher import FisherImportance
from optin_hf.tasks.task_data import DataSpec
from optin_hf.tasks.workflow import PruneJob, run_prune


def labelled(arch: str, n: int = 7, regression: bool = False) -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(3)
    labels = torch.randn(n, generator=g) if regression else torch.randint(0, 5 if arch == "vit" else 3, (n,), generator=g)
    return [{**ex, "labels": label} for ex, label in zip(calibration(arch, n=n), labels)]


def classifier_loss(model, inputs: dict[str, torch.Tensor], label: torch.Tensor) -> torch.Tensor:
    """One example's cross-entropy (squared error for a regressor) on its label."""
    logits = model(**inputs).logits
    return (logits[0, 0] - label) ** 2 if logits.shape[-1] == 1 else F.cross_entropy(logits, label.view(1))


def by_hand(model, examples, labels, loss_of=classifier_loss) -> tuple[torch.Tensor, torch.Tensor]:
    """Sum over examples, one at a time, of (d loss / d m)^2 for a scalar mask m on every unit;
    `loss_of(model, inputs, label)` is one example's loss (inputs batched by one)."""
    adapter = get_adapter(model)
    layers, heads, neurons = len(adapter.layers_of(model)), adapter.num_heads(model.config), adapter.intermediate_size(model.config)
    head_fisher, neuron_fisher = torch.zeros(layers, heads, dtype=torch.float64), torch.zeros(layers, neurons, dtype=torch.float64)
    for ex, label in zip(examples, labels):
        units = [torch.ones((), requires_grad=True) for _ in range(layers * (heads + neurons))]
        head_mask = torch.stack(units[: layers * heads]).view(layers, heads)
        neuron_mask = torch.stack(units[layers * heads :]).view(layers, neurons)
        with apply_masks(model, adapter, head_mask, neuron_mask):
            loss = loss_of(model, {k: v[None] for k, v in ex.items() if k != "labels"}, label)
        grads = torch.stack(torch.autograd.grad(loss, units)).double() ** 2
        head_fisher += grads[: layers * heads].view(layers, heads)
        neuron_fisher += grads[layers * heads :].view(layers, neurons)
    return head_fisher, neuron_fisher


def fisher(model, data, **kw):
    config = OptinConfig(importance="fisher", num_samples=len(data), batch_size=3, **kw)
    return OptinPruner(config).compute_scores(model, data)


def regressor():
    torch.manual_seed(0)
    return BertForSequenceClassification(BertConfig(**{**TEXT, "num_labels": 1}, **BLOCK)).eval()


@pytest.mark.parametrize("arch", ["bert", "vit", "regression"])
def test_scores_equal_per_example_autograd(arch):
    model = regressor() if arch == "regression" else tiny_model(arch)
    data = labelled("bert" if arch == "regression" else arch, regression=arch == "regression")
    scores = fisher(model, data)  # batches of 3, padded: each example's gradient stays its own
    heads, neurons = by_hand(model, data, [ex["labels"] for ex in data])
    assert scores.criterion == "fisher" and (scores.head_scores > 0).all()
    torch.testing.assert_close(scores.head_scores, heads, rtol=1e-4, atol=1e-7 * float(heads.max()))
    torch.testing.assert_close(scores.neuron_scores, neurons, rtol=1e-4, atol=1e-7 * float(neurons.max()))


def test_without_labels_the_model_own_predictions_are_the_labels():
    model = tiny_model("bert")
    data = calibration("bert", n=7)
    with torch.no_grad():
        predicted = [model(**{k: v[None] for k, v in ex.items()}).logits.argmax(-1)[0] for ex in data]
    heads, neurons = by_hand(model, data, predicted)
    scores = fisher(model, data)
    torch.testing.assert_close(scores.head_scores, heads, rtol=1e-4, atol=1e-7 * float(heads.max()))
    torch.testing.assert_close(scores.neuron_scores, neurons, rtol=1e-4, atol=1e-7 * float(neurons.max()))
    assert not torch.allclose(scores.head_scores, fisher(model, labelled("bert")).head_scores)  # the labels are used


def test_disabled_kind_scores_zero():
    scores = fisher(tiny_model("bert"), labelled("bert"), prune_heads=False, mac_constraint=0.8)
    assert (scores.head_scores == 0).all() and (scores.neuron_scores > 0).all()


def test_models_fisher_cannot_score_raise_clearly():
    with pytest.raises(ValueError, match="bare encoder.*AutoModelForSequenceClassification"):
        fisher(tiny_model("bert-encoder"), calibration("bert", n=4))
    with pytest.raises(ValueError, match="regression model needs labelled"):
        fisher(regressor(), calibration("bert", n=4))


def test_pruner_prunes_end_to_end_without_leaving_grads():
    model = tiny_model("bert")
    data = labelled("bert", n=12)
    pruner = OptinPruner(OptinConfig(importance="fisher", mac_constraint=0.6, num_samples=12, batch_size=5))
    dense_macs = count_macs(model, pruner.compute_scores(model, data) and pruner.seq_len)
    pruner.prune_model(model, data)
    assert all(p.grad is None and p.requires_grad for p in model.parameters())
    assert not model.training
    assert 0.98 * 0.6 * dense_macs <= count_macs(model, pruner.seq_len) <= 0.6 * dense_macs


def test_prune_job_gives_fisher_the_calibration_labels(tmp_path, monkeypatch):
    trained_text_model(tmp_path / "model")
    write_csv(tmp_path / "data.csv", n=40, label_names=True)  # labels as class names, mapped by label2id
    seen, score = [], FisherImportance.__call__

    def recording(self, model, adapter, batches, config):
        seen.extend(batches)
        return score(self, model, adapter, batches, config)

    monkeypatch.setattr(FisherImportance, "__call__", recording)
    config = OptinConfig(importance="fisher", mac_constraint=0.6, num_samples=8, batch_size=4)
    data = DataSpec(str(tmp_path / "data.csv"), calibration_split="train[:16]", eval_split="train[16:]")
    report = run_prune(PruneJob(config, tmp_path / "out", model=str(tmp_path / "model"), data=data))
    assert sum(len(b["labels"]) for b in seen) == 8
    for batch in seen:  # each sentence repeats the marker word of its label three times
        for ids, label in zip(batch["input_ids"], batch["labels"]):
            assert (ids == WORDS.index(MARKERS[label])).sum() == 3
    assert report is not None and (tmp_path / "out" / "optin_config.json").is_file()


def _close(scores, expected: tuple[torch.Tensor, torch.Tensor]) -> None:
    heads, neurons = expected
    torch.testing.assert_close(scores.head_scores, heads, rtol=1e-4, atol=1e-6 * float(heads.max()))
    torch.testing.assert_close(scores.neuron_scores, neurons, rtol=1e-4, atol=1e-6 * float(neurons.max()))


@pytest.mark.usefixtures("one_thread")
@pytest.mark.parametrize("name", ["swin", "mask2former"])
def test_window_attention_gives_each_example_its_own_gradient(name):
    """Swin runs an example's windows as consecutive batch rows: in batches of 3, each window gets its
    example's head mask, so the scores are the per-example ones (issue 24: a size-mismatch traceback).
    Without labels, the dense prediction (Mask2Former's semantic map, per pixel) is the target."""
    family = FAMILIES[name]
    model, data = family.build(), family.examples(3, 1)
    adapter = get_adapter(model)
    with torch.no_grad():
        predicted = [adapter.logits_of(model(pixel_values=ex["pixel_values"][None])).argmax(1)[0] for ex in data]

    def own_prediction_loss(model, inputs, label):
        return F.cross_entropy(adapter.logits_of(model(**inputs)), label[None])  # the mean over pixels

    expected = by_hand(model, data, predicted, classifier_loss if name == "swin" else own_prediction_loss)
    _close(fisher(model, data), expected)


@pytest.mark.usefixtures("one_thread")
def test_segformer_label_maps_give_the_model_own_loss_per_image():
    """A label map per image (at the image's resolution, with unlabelled 255 pixels) is scored by the loss
    SegFormer trains with: the logits upsampled to the map, a cross-entropy over its labelled pixels."""
    model, images = FAMILIES["segformer"].build(), FAMILIES["segformer"].examples(3, 1)
    g = torch.Generator().manual_seed(4)
    maps = [torch.randint(0, model.config.num_labels, (32, 32), generator=g) for _ in images]
    for label in maps:
        label[:5] = model.config.semantic_loss_ignore_index
    data = [{**ex, "labels": label} for ex, label in zip(images, maps)]

    def segformer_loss(model, inputs, label):
        return model(**inputs, labels=label[None]).loss

    _close(fisher(model, data), by_hand(model, data, maps, segformer_loss))


def test_a_multi_label_classifier_is_scored_by_its_own_loss():
    """problem_type="multi_label_classification" trains a sigmoid per label: its Fisher loss is that BCE."""
    torch.manual_seed(0)
    model = BertForSequenceClassification(BertConfig(**TEXT, **BLOCK, problem_type="multi_label_classification")).eval()
    labels = torch.randint(0, 2, (7, TEXT["num_labels"]), generator=torch.Generator().manual_seed(3)).float()
    data = [{**ex, "labels": label} for ex, label in zip(calibration("bert", n=7), labels)]

    def multi_label_loss(model, inputs, label):
        return model(**inputs, labels=label[None]).loss

    _close(fisher(model, data), by_hand(model, data, labels, multi_label_loss))
