import numpy as np
import pytest
from tiny import BLOCK, TEXT
from transformers import BertConfig, BertForSequenceClassification

from optin_hf.tasks import metrics
from optin_hf.tasks.metrics import load_metric
from optin_hf.tasks.workflow import _check_metric


def test_local_formulas_match_scipy_and_sklearn():
    sklearn_metrics = pytest.importorskip("sklearn.metrics")
    stats = pytest.importorskip("scipy.stats")
    rng = np.random.default_rng(0)
    p, r = rng.integers(0, 2, 200), rng.integers(0, 2, 200)
    assert metrics.accuracy(p, r) == pytest.approx(sklearn_metrics.accuracy_score(r, p))
    assert metrics.f1(p, r) == pytest.approx(sklearn_metrics.f1_score(r, p))
    p3, r3 = rng.integers(0, 3, 200), rng.integers(0, 3, 200)
    assert metrics.matthews_correlation(p3, r3) == pytest.approx(sklearn_metrics.matthews_corrcoef(r3, p3))
    scores, gold = rng.normal(size=300), rng.integers(0, 6, 300).astype(float)  # ties, as STS-B's gold scores
    scores[:50] = scores[50:100]  # ties among predictions too
    assert metrics.pearson(scores, gold) == pytest.approx(stats.pearsonr(scores, gold)[0])
    assert metrics.spearmanr(scores, gold) == pytest.approx(stats.spearmanr(scores, gold)[0])


def test_glue_metrics_have_evaluate_keys_and_main_score(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    mrpc = load_metric("glue/mrpc")
    assert mrpc.compute([1, 0, 1, 1], [1, 0, 0, 1]) == pytest.approx({"accuracy": 0.75, "f1": 0.8})
    stsb = load_metric("glue/stsb")
    assert stsb.regression and stsb.main == "spearmanr" and set(stsb.compute([0.1, 0.5, 0.2], [1.0, 4.0, 3.0])) == {"pearson", "spearmanr"}
    assert load_metric("glue/cola").main == "matthews_correlation"
    assert "local (offline mode)" in load_metric("accuracy").source
    with pytest.raises(ValueError, match="Unknown metric 'glue/foo'"):
        load_metric("glue/foo")


def test_evaluate_module_is_used_when_it_loads(monkeypatch):
    import evaluate

    calls = []

    class Module:
        def compute(self, predictions, references):
            calls.append((list(predictions), list(references)))
            return {"accuracy": 0.5}

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)
    monkeypatch.setattr(evaluate, "load", lambda path, config=None: Module())
    metric = load_metric("glue/sst2")
    assert metric.source == "evaluate (glue/sst2)"
    assert metric.compute([1, 0], [1, 1]) == {"accuracy": 0.5} and calls == [([1, 0], [1, 1])]

    def offline(*args, **kwargs):
        raise FileNotFoundError("Couldn't find a module script")

    monkeypatch.setattr(evaluate, "load", offline)
    fallback = load_metric("glue/sst2")
    assert "FileNotFoundError" in fallback.source and fallback.compute([1, 0], [1, 1]) == {"accuracy": 0.5}


def test_offline_argument_skips_evaluate(monkeypatch):
    """The Space asks for the local formula: no Hub round trip, whatever the environment says."""
    import evaluate

    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("HF_EVALUATE_OFFLINE", raising=False)

    def must_not_load(*args, **kwargs):
        raise AssertionError("evaluate.load called although offline=True")

    monkeypatch.setattr(evaluate, "load", must_not_load)
    metric = load_metric("accuracy", offline=True)
    assert "local (offline mode)" in metric.source and metric.compute([1, 0, 2], [1, 1, 2]) == pytest.approx({"accuracy": 2 / 3})
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(evaluate, "load", lambda path, config=None: pytest.fail("offline by environment"))
    assert "local" in load_metric("accuracy").source


def classifier(num_labels: int) -> BertForSequenceClassification:
    return BertForSequenceClassification(BertConfig(**{**TEXT, "num_labels": num_labels}, **BLOCK))


@pytest.mark.parametrize("name", ["glue/mrpc", "glue/qqp"])
def test_a_binary_f1_metric_needs_a_model_with_two_labels(name):
    """Their F1 is class 1's against all others: on 3 classes it reports a meaningless number (0.5)."""
    metric = load_metric(name, offline=True)
    for num_labels in (3, 5):
        with pytest.raises(ValueError, match=rf"Metric {name} scores the binary F1 of class 1, which needs a model with 2 "
                           rf"labels, and this one has num_labels={num_labels}: use --metric accuracy"):
            _check_metric(metric, classifier(num_labels))
    _check_metric(metric, classifier(2))


@pytest.mark.parametrize("name", ["accuracy", "glue/cola", "glue/mnli", "glue/sst2"])
def test_multiclass_metrics_fit_any_number_of_labels(name):
    """Accuracy, and Matthews' correlation (multiclass by its definition), hold for any number of classes."""
    assert not load_metric(name, offline=True).binary
    for num_labels in (2, 3):
        _check_metric(load_metric(name, offline=True), classifier(num_labels))
