"""The Gradio Space (`space_app/app.py`): its calls into the application layer, every embedded default offered,
the segmentation panel and the language model's samples on tiny stand-ins, and the page driven in headless
Chromium with Selenium on a tiny BERT and a tiny SegFormer."""

from __future__ import annotations

import ast
import copy
import dataclasses
import importlib.util
import re
import os
import shutil
import socket
import sys
import tempfile
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
WORDS = "good bad great awful fine poor nice terrible movie film plot actor the a was is".split()


def _binary(path: str) -> str | None:
    """`path` if executable, else the same program found on PATH (or None)."""
    return path if os.access(path, os.X_OK) else shutil.which(Path(path).name)


CHROMIUM = _binary("/usr/bin/chromium")
CHROMEDRIVER = _binary("/usr/bin/chromedriver")


def _browser_missing() -> str | None:
    """The first piece a real-browser run lacks, or None."""
    if importlib.util.find_spec("selenium") is None:
        return "python package 'selenium' is not installed (pip install -e '.[space]')"
    for name, binary in (("chromium", CHROMIUM), ("chromedriver", CHROMEDRIVER)):
        if binary is None:
            return f"{name} is not installed (bash .ci/browser installs chromium and chromium-driver)"
    return None


# gradio's queue calls a pandas API that pandas 3 deprecates; not ours to fix.
pytestmark = pytest.mark.filterwarnings("ignore:.*(no_silent_downcasting|copy keyword).*")

if importlib.util.find_spec("gradio") is None:
    pytest.skip("python package 'gradio' is not installed (pip install -e '.[space]')", allow_module_level=True)
BROWSER_MISSING = _browser_missing()
needs_browser = pytest.mark.skipif(BROWSER_MISSING is not None, reason=str(BROWSER_MISSING))

os.environ["GRADIO_ANALYTICS_ENABLED"] = "False"
sys.path.insert(0, str(ROOT / "space_app"))

import torch  # noqa: E402
from datasets import Dataset  # noqa: E402

if BROWSER_MISSING is None:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.by import By
    from selenium.webdriver.common.keys import Keys
    from selenium.webdriver.support.ui import WebDriverWait
from huggingface_hub import create_repo, upload_folder  # noqa: E402
from tokenizers import Tokenizer, models, pre_tokenizers  # noqa: E402
from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast  # noqa: E402

import app as space  # noqa: E402
from conftest import FAKE_TOKEN  # noqa: E402
from tiny import tiny_llm, tiny_segformer  # noqa: E402
from tiny_task import tokenizer as tiny_tokenizer  # noqa: E402

from optin_hf import OptinConfig  # noqa: E402
from optin_hf.tasks import report  # noqa: E402
from optin_hf.tasks.defaults import DEFAULT_NAMES  # noqa: E402
from optin_hf.tasks.recipes import default_recipe  # noqa: E402
from optin_hf.tasks.windows import evaluation_windows, negative_log_likelihood  # noqa: E402
from optin_hf.tasks.workflow import load_model  # noqa: E402


def tiny_task() -> space.DemoTask:
    """A random 2-layer BERT with a word-level tokenizer, built offline in well under a second."""
    vocab = {w: i for i, w in enumerate(["[PAD]", "[UNK]", "[CLS]", "[SEP]", *WORDS])}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, pad_token="[PAD]", unk_token="[UNK]")
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(vocab), hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                        intermediate_size=8, max_position_embeddings=64, num_labels=2)
    g = torch.Generator().manual_seed(0)
    texts = [" ".join(WORDS[int(i)] for i in torch.randint(0, len(WORDS), (int(n),), generator=g))
             for n in torch.randint(4, 12, (24,), generator=g)]
    data = Dataset.from_dict({"text": texts, "label": [i % 2 for i in range(24)]})
    return space.DemoTask(BertForSequenceClassification(config).eval(), tokenizer, data.select(range(12)),
                          data.select(range(12, 24)), ["negative", "positive"], "text-classification")


def tiny_scenes_task() -> space.DemoTask:
    """A random tiny SegFormer (4 classes) and 16 scenes of 32x32 pixels whose class map is each pixel's
    brightness quartile: a segmentation default's shape, built offline in well under a second."""
    g = torch.Generator().manual_seed(0)
    pixels = torch.rand(16, 3, 32, 32, generator=g)
    maps = (pixels.mean(1) * 4).long().clamp(max=3)
    data = Dataset.from_dict({"pixel_values": pixels.numpy(), "label": maps.numpy()})
    return space.DemoTask(tiny_segformer(), None, data.select(range(8)), data.select(range(8, 16)),
                          ["background", "one", "two", "three"], "semantic-segmentation")


TINY_SEGFORMER_SETTINGS = {"num_samples": 4, "batch_size": 4, "neuron_group_size": 8, "reconstruct_samples": 8}


def tiny_llm_task() -> space.DemoTask:
    """A random tiny Llama with a word-level tokenizer, and lines of its words as calibration and held-out text."""
    rng = torch.Generator().manual_seed(0)
    lines = ["\n".join(" ".join(f"w{int(i)}" for i in torch.randint(0, 100, (8,), generator=rng)) for _ in range(12))
             for _ in range(4)]
    data = Dataset.from_dict({"text": lines})
    return space.DemoTask(tiny_llm("llama"), tiny_tokenizer(), data.select(range(2)), data.select(range(2, 4)), [],
                          "text-generation", eval_window=16, max_eval_samples=3)


def _handler(demo, name: str):
    return next(block.fn for block in demo.fns.values() if block.name == name)


def _shown(outputs: dict) -> dict:
    return {getattr(component, "elem_id", None): value for component, value in outputs.items()}


def _with_settings(settings: dict, lighter: dict | None = None) -> space.DemoTask:
    """tiny_task() as an embedded default with these recipe settings (and the Space's lighter ones)."""
    return dataclasses.replace(tiny_task(), settings=settings, lighter=lighter or {})


def test_the_space_offers_every_embedded_default_with_its_recipe(tmp_path):
    """The Model menu lists every default of the registry (ResNet, SegFormer and the language model included), and
    each runs its CLI recipe's settings, scored once, within the Space's scoring time and refit examples and with its
    lighter settings, and the status says where that differs from the recipe; building the page loads no model."""
    demo = space.build_demo()
    menu = next(block for block in demo.blocks.values() if getattr(block, "elem_id", None) == "model")
    assert [choice[0] for choice in menu.choices] == [*DEFAULT_NAMES, space.HUB_CHOICE]
    for name in DEFAULT_NAMES:  # picking a default moves the slider to its recipe's budget
        assert _handler(demo, "on_pick")(name)["value"] == default_recipe(name).optin.mac_constraint
    assert "value" not in _handler(demo, "on_pick")(space.HUB_CHOICE)
    assert {"digits-resnet", "digit-scenes-segformer"} <= set(DEFAULT_NAMES)
    assert set(space.SPACE_LIGHTER) <= set(DEFAULT_NAMES)  # a stale name would lighten nothing
    app = space.SpaceApp(space.default_loaders(), dict(space.SPACE_SETTINGS), tmp_path)
    assert list(app.models) == list(DEFAULT_NAMES)
    for name in DEFAULT_NAMES:
        recipe = default_recipe(name).optin.to_dict()
        settings = app.settings_for(_with_settings(recipe, space.SPACE_LIGHTER.get(name)))
        # A recipe's importance="auto" prunes with every candidate: the Space re-allocates OPTIN's cached scores.
        assert settings == {**recipe, "max_scoring_time": min(recipe["max_scoring_time"] or 45.0, 45.0),
                            "reconstruct_samples": min(recipe["reconstruct_samples"], 128), "prune_steps": 1,
                            "importance": "optin", **space.SPACE_LIGHTER.get(name, {})}
        OptinConfig(**settings)  # every default's settings are valid as the Space runs them
    recipe = {**OptinConfig(importance="optin").to_dict(), "max_scoring_time": 240.0, "reconstruct_samples": 32, "prune_steps": 2}
    assert app.lighter(_with_settings(recipe)) == ("Lighter than its CLI recipe here: max_scoring_time=45 (its recipe: "
                                                   "240), prune_steps=1 (its recipe: 2).")
    assert app.lighter(_with_settings({**recipe, "max_scoring_time": None, "reconstruct_samples": 256},
                                      {"num_samples": 4})) == (
        "Lighter than its CLI recipe here: num_samples=4 (its recipe: 128), max_scoring_time=45 (its recipe: none), "
        "reconstruct_samples=128 (its recipe: 256), prune_steps=1 (its recipe: 2).")
    assert app.lighter(_with_settings({**recipe, "max_scoring_time": 30.0, "prune_steps": 1})) == ""
    assert app.lighter(_with_settings({**recipe, "max_scoring_time": 30.0, "prune_steps": 1, "reconstruct_samples": 256,
                                       "reconstruct": "none"})) == ""  # refit examples matter only to a repair
    assert app.lighter(_with_settings({**recipe, "importance": "auto", "max_scoring_time": 30.0, "prune_steps": 1})) == (
        "Lighter than its CLI recipe here: importance=optin (its recipe: auto).")
    assert app.lighter(tiny_task()) == ""  # a Hub model runs the Space's own settings


def test_a_default_loads_with_its_recipe_and_the_spaces_lighter_settings(monkeypatch):
    """The loader hands the Space what `load_default` gives (a stand-in here: the real one trains), with the settings
    of the default's CLI recipe and of SPACE_LIGHTER, and the language model's evaluation windows."""
    import optin_hf.tasks.defaults as defaults

    stand_in = tiny_llm_task()
    loaded = defaults.DefaultTask("shakespeare-smollm2", stand_in.task, stand_in.model, stand_in.processor,
                                  stand_in.calibration, stand_in.test, [], Path("unused"), eval_window=128,
                                  max_eval_samples=64)
    monkeypatch.setattr(defaults, "load_default", lambda name: loaded if name == loaded.name else pytest.fail(name))
    task = space.default_loaders()["shakespeare-smollm2"]()
    assert (task.model, task.processor, task.calibration, task.test) == (stand_in.model, stand_in.processor,
                                                                        stand_in.calibration, stand_in.test)
    assert task.settings == default_recipe("shakespeare-smollm2").optin.to_dict()
    assert task.lighter == space.SPACE_LIGHTER["shakespeare-smollm2"]
    assert (task.task, task.eval_window, task.max_eval_samples) == ("text-generation", 128, 64)


def test_a_hub_model_that_is_no_classifier_is_refused(monkeypatch):
    """The Hub box prunes classifiers; a segmenter typed there gets one clear message, not a failure deep inside."""
    monkeypatch.setattr(space, "load_model", lambda *args, **kwargs: (tiny_segformer(), None, "semantic-segmentation"))
    with pytest.raises(ValueError, match="someone/segformer is a semantic-segmentation model; this Space prunes Hub "
                                         "text and image classifiers"):
        space.hub_loader("someone/segformer", "", "org/scenes", 8)()


@pytest.mark.usefixtures("one_thread")
def test_the_segmentation_result_shows_image_truth_dense_and_pruned_side_by_side(monkeypatch):
    """A Prune of a segmenter shows test scenes as the report draws them (`report.segmentation_figure`): image, ground
    truth, the dense and the pruned model's masks; Compare shows the chosen scene; the table gives mean IoU."""
    monkeypatch.setattr(report, "time_models", lambda models, inputs, runs: {"dense": [0.004], "pruned": [0.001]})
    demo = space.build_demo({"tiny-segformer": tiny_scenes_task}, settings=TINY_SEGFORMER_SETTINGS)
    outputs = _handler(demo, "on_prune")("tiny-segformer", 0.5, "", "", "", "")
    shown = _shown(outputs)
    assert "Pruned" in shown["status"] and "Scored 5 attention heads and 96 Mix-FFN channels" in shown["status"]
    result = next(value for value in outputs.values() if isinstance(value, space.PruneResult))
    task = tiny_scenes_task()
    figure = shown["segmentation"]
    assert figure._suptitle.get_text() == "semantic segmentation: dense vs pruned"
    rows = [figure.axes[4 * i: 4 * i + 4] for i in range(space.SEGMENTATION_SCENES)]
    assert [ax.get_title() for ax in rows[0]] == ["image", "ground truth", "dense", "pruned"]
    pixels = np.asarray(task.test["pixel_values"][:space.SEGMENTATION_SCENES], dtype=np.float32)
    batch = {"pixel_values": torch.as_tensor(pixels)}
    masks = [np.asarray(m) for m in task.test["label"][:space.SEGMENTATION_SCENES]]
    dense = report.class_maps(report.predicted_logits(task.model, batch), masks)
    pruned = report.class_maps(report.predicted_logits(result.model, batch), masks)
    assert any((d != p).any() for d, p in zip(dense, pruned))  # so the columns below tell the two models apart
    for axes, mask, d, p in zip(rows, masks, dense, pruned):
        for ax, expected in zip(axes[1:], (mask, d, p)):
            assert np.array_equal(np.asarray(ax.images[0].get_array()), expected)
    assert shown["results"].iloc[0, 0] == f"mean iou ({len(task.test)} test examples)"

    compared = _shown(_handler(demo, "on_compare")(result, "", 5))
    one = compared["segmentation"].axes
    assert len(one) == 4 and np.array_equal(np.asarray(one[1].images[0].get_array()), np.asarray(task.test["label"][5]))
    with pytest.warns(UserWarning, match="no test image of that number"):  # gradio's toast
        assert "Error" in _shown(_handler(demo, "on_compare")(result, "", 8))["compare_msg"]  # past the last test scene


@pytest.mark.usefixtures("one_thread")
def test_a_language_model_shows_dense_and_pruned_perplexity_and_a_sample_of_each(monkeypatch):
    """Perplexity on the task's held-out windows (its window length and count), and greedy continuations of a held-out
    prompt by the dense and by the pruned model."""
    monkeypatch.setattr(report, "tokens_per_second", lambda models, seq_len, runs: {
        name: {"forward_batch_16_s": 0.01, "forward_batch_16": 1.0} for name in models})
    demo = space.build_demo({"tiny-llama": tiny_llm_task}, settings={
        "num_samples": 4, "batch_size": 4, "max_length": 16, "reconstruct_samples": 4, "neuron_group_size": 8})
    outputs = _handler(demo, "on_prune")("tiny-llama", 0.6, "", "", "", "")
    shown = _shown(outputs)
    assert "Pruned" in shown["status"], shown["status"]
    result = next(value for value in outputs.values() if isinstance(value, space.PruneResult))
    task = tiny_llm_task()
    windows = evaluation_windows(task.test, "text", task.processor, 16, 3)
    perplexity = [np.exp(nll / tokens) for nll, tokens in (negative_log_likelihood(m, windows)
                                                           for m in (task.model, result.model))]
    row = shown["results"].iloc[0]
    assert row.iloc[0] == "perplexity (3 held-out windows of 16 tokens)"
    assert [float(row.iloc[1]), float(row.iloc[2])] == pytest.approx(perplexity, abs=0.006)
    prompt = shown["inp"]["value"]
    assert prompt.strip() and prompt in task.test[0]["text"] + "\n"
    samples = [space.continuation(m, task.processor, prompt) for m in (task.model, result.model)]
    assert [shown["dense_sample"], shown["pruned_sample"]] == samples and samples[0] != samples[1]
    compared = _shown(_handler(demo, "on_compare")(result, "w1 w2 w3", 0))
    assert compared["pruned_sample"] == space.continuation(result.model, task.processor, "w1 w2 w3")


def test_the_page_shows_what_the_application_layer_measures(tmp_path, monkeypatch):
    """Accuracy, latency and number formatting come from optin_hf.tasks.report; the dense model is evaluated once."""
    task = tiny_task()
    evaluated = []

    def evaluate_model(model, data, encoder, labels, metric):
        evaluated.append((model, data.max_eval_samples))
        return {"accuracy": 0.75 if model is task.model else 0.5}, 12, None

    monkeypatch.setattr(report, "evaluate_model", evaluate_model)
    monkeypatch.setattr(report, "time_models", lambda models, inputs, runs: {"dense": [0.004], "pruned": [0.001]})
    monkeypatch.setattr(report, "format_si", lambda value: f"si<{value:.0f}>")
    app = space.SpaceApp({"tiny-bert": tiny_task}, dict(space.SPACE_SETTINGS), tmp_path)
    key = ("named", "tiny-bert")
    pruned = [copy.deepcopy(task.model) for _ in range(2)]
    frame = space.results_table(app.measure(key, task, pruned[0], seq_len=10.0))
    rows = {row[0]: list(row[1:]) for row in frame.itertuples(index=False)}
    assert rows["accuracy (12 test examples)"] == ["75.0 %", "50.0 %", "-25.0 pt"]
    assert rows["latency, batch of 32"] == ["4.0 ms", "1.0 ms", "0.25"]
    params = sum(p.numel() for p in task.model.parameters())
    assert rows["parameters"] == [f"si<{params}>", f"si<{params}>", "1.00"]
    assert rows["MACs per example (10 tokens)"][0].startswith("si<")
    space.results_table(app.measure(key, task, pruned[1], seq_len=10.0))
    assert evaluated == [(task.model, space.SPACE_TEST_EXAMPLES), (pruned[0], 300), (pruned[1], 300)]


def test_hub_models_load_through_the_workflow(monkeypatch):
    """A visitor's id loads as a Hub id only, anonymously unless the visitor gives a read token."""
    task = tiny_task()
    asked = []

    def load_model(name, **kwargs):
        asked.append((name, kwargs))
        return task.model, task.processor, task.task

    monkeypatch.setattr(space, "load_model", load_model)
    loaded = space.hub_loader("someone/tiny-bert", "the movie was great\n\n the plot was poor ", "", 8)()
    assert asked == [("someone/tiny-bert", {"hub_only": True, "token": False})]
    assert loaded.model is task.model and loaded.processor is task.processor
    assert loaded.calibration["text"] == ["the movie was great", "the plot was poor"] and loaded.test is None
    assert loaded.label_names == ["LABEL_0", "LABEL_1"] and loaded.task == "text-classification"
    space.hub_loader("someone/private-bert", "text", "", 8, " hf_visitor ")()
    assert asked[-1] == ("someone/private-bert", {"hub_only": True, "token": "hf_visitor"})


@pytest.mark.parametrize("dataset_id", ["/data/set", "./set", "../set", "~/set", "a/b/c", "csv", "imagefolder"])
def test_a_visitor_dataset_id_is_a_full_hub_id_or_refused(dataset_id, monkeypatch):
    """A path, or a bare datasets builder name (csv, imagefolder: they read this machine's files), is refused before
    the model or any data loads."""
    monkeypatch.setattr(space, "load_model", lambda *args, **kwargs: pytest.fail("the model loaded first"))
    with pytest.raises(ValueError, match=rf"(The dataset '{re.escape(dataset_id)}' is not a Hub repo id .*never a path on "
                                         rf"this machine|Give the dataset's full Hub id, org/name, not '{dataset_id}')"):
        space.hub_loader("someone/tiny-bert", "", dataset_id, 8)()


def test_a_read_token_keys_the_loaded_model(tmp_path):
    """A private model loaded with one visitor's token is never handed from the cache to a session without it."""
    app = space.SpaceApp({"tiny-bert": tiny_task}, dict(space.SPACE_SETTINGS), tmp_path)
    keys = {app.resolve(space.HUB_CHOICE, "org/model", "text", "", token)[0] for token in ("", "hf_a", "hf_b")}
    assert len(keys) == 3


def test_the_chart_is_the_reports_own_figure(monkeypatch):
    """The Space shows `Report.figure`, the drawing `optin_report.png` is saved from, not a copy of its own: kept
    units over each layer's dense width, and the metric against the MACs kept."""
    monkeypatch.setattr(report, "time_models", lambda models, inputs, runs: {"dense": [0.004], "pruned": [0.001]})
    demo = space.build_demo({"tiny-bert": tiny_task}, settings={"num_samples": 8, "batch_size": 8})
    on_prune = next(block.fn for block in demo.fns.values() if block.name == "on_prune")
    outputs = on_prune("tiny-bert", 0.5, "", "", "", "")
    shown = {getattr(component, "elem_id", None): value for component, value in outputs.items()}
    assert "Pruned" in shown["status"]
    heads_ax, neurons_ax, metric_ax = shown["chart"].axes
    result = next(value for value in outputs.values() if isinstance(value, space.PruneResult))
    kept = result.pruner.masks.neurons_per_layer()
    assert [p.get_height() for p in neurons_ax.patches] == [8, 8, *kept]  # dense widths in grey, then the kept
    assert neurons_ax.get_title() == f"FFN neurons: {sum(kept)} of 16 kept"
    assert metric_ax.get_title().startswith("accuracy vs MACs")


def test_the_space_keeps_only_ui():
    """No measurement, formatting or model loading of its own: those live in optin_hf.tasks."""
    tree = ast.parse((ROOT / "space_app" / "app.py").read_text())
    functions = {node.name for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))}
    copies = {name for name in functions if re.search(r"accura|latenc|metric|^_?si$|format|_model$|_inputs$", name)}
    assert copies == set()
    used = {node.id for node in ast.walk(tree) if isinstance(node, ast.Name)}
    used |= {node.attr for node in ast.walk(tree) if isinstance(node, ast.Attribute)}
    imported = {alias.name for node in ast.walk(tree) if isinstance(node, (ast.Import, ast.ImportFrom)) for alias in node.names}
    assert not (used | imported) & {"count_macs", "statistics", "prepare_calibration", "from_pretrained", "AutoConfig"}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def url(one_thread):
    demo = space.build_demo({"tiny-bert": tiny_task, "tiny-segformer": tiny_scenes_task},
                            settings={"num_samples": 8, "batch_size": 8, "md_tokens": 32, "neuron_group_size": 8})
    port = _free_port()
    demo.launch(server_name="127.0.0.1", server_port=port, prevent_thread_lock=True, quiet=True)
    yield f"http://127.0.0.1:{port}"
    demo.close()


@pytest.fixture(scope="module")
def browser():
    if BROWSER_MISSING is not None:
        pytest.skip(BROWSER_MISSING)
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in ("--headless=new", "--no-sandbox", "--disable-dev-shm-usage", "--window-size=1400,1800"):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    yield driver
    driver.quit()


def _text(driver, selector: str) -> str:
    return driver.find_element(By.CSS_SELECTOR, selector).text


def _wait_text(driver, selector: str, needle: str, timeout: float = 90) -> str:
    """Wait until the element's text contains `needle`; fail with what the page shows instead."""
    try:
        WebDriverWait(driver, timeout).until(lambda d: needle in _text(d, selector))
    except Exception:
        pytest.fail(f"{selector} never showed {needle!r}; it shows {_text(driver, selector)!r}")
    return _text(driver, selector)


def _set_slider(driver, value: float) -> None:
    """Type a value into the slider's number box, as a user would."""
    box = driver.find_element(By.CSS_SELECTOR, "#budget input[type=number]")
    box.clear()
    box.send_keys(str(value))
    box.send_keys("\t")


def _click(driver, elem_id: str) -> None:
    driver.find_element(By.CSS_SELECTOR, f"#{elem_id}").click()


def _pick_model(driver, choice: str) -> None:
    """Pick `choice` in the Model dropdown, as a visitor would."""
    driver.find_element(By.CSS_SELECTOR, "#model input").click()
    driver.find_element(By.CSS_SELECTOR, f'#model li[aria-label="{choice}"]').click()


def _type_hub_model(driver, model_id: str, texts: str, token: str = "") -> None:
    """Pick "Hub model id" in the Model dropdown, open the Hub box and fill it in, as a visitor would."""
    _pick_model(driver, space.HUB_CHOICE)
    if not any(box.is_displayed() for box in driver.find_elements(By.CSS_SELECTOR, "#hub_id textarea")):  # starts closed
        driver.find_element(By.CSS_SELECTOR, "#hub_box button.label-wrap").click()
    WebDriverWait(driver, 10).until(lambda d: d.find_element(By.CSS_SELECTOR, "#hub_id textarea").is_displayed())
    fields = {"#hub_id textarea": model_id, "#hub_texts textarea": texts, **({"#read_token input": token} if token else {})}
    for selector, value in fields.items():
        box = driver.find_element(By.CSS_SELECTOR, selector)
        box.send_keys(Keys.CONTROL, "a")
        box.send_keys(Keys.BACKSPACE)  # WebElement.clear() would bypass the page's input events
        box.send_keys(value)


def _save_tiny_task(folder: Path) -> Path:
    """tiny_task()'s model and tokenizer as save_pretrained writes them: a real model folder, as on a host's disk."""
    task = tiny_task()
    task.model.save_pretrained(folder)
    task.processor.save_pretrained(folder)
    return folder


@needs_browser
def test_prune_compare_and_rescore_in_browser(url, browser, tmp_path, hub_server):
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prune"))

    _set_slider(browser, 0.5)
    _click(browser, "prune")
    status = _wait_text(browser, "#status", "Pruned")
    assert "Scored" in status and "reused" not in status.lower()
    table = _wait_text(browser, "#results", "MACs")
    assert "accuracy" in table and "latency" in table
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#chart img, #chart svg, #chart canvas"))

    browser.find_element(By.CSS_SELECTOR, "#inp textarea").send_keys("the movie was great")
    _click(browser, "compare")
    _wait_text(browser, "#pruned_pred", "%")
    assert any(label in _text(browser, "#dense_pred") for label in ("positive", "negative"))
    assert any(label in _text(browser, "#pruned_pred") for label in ("positive", "negative"))

    _set_slider(browser, 0.8)
    _click(browser, "prune")
    status = _wait_text(browser, "#status", "Scores reused")
    assert "0.80" in status

    box = browser.find_element(By.CSS_SELECTOR, "#inp textarea")
    box.send_keys(Keys.CONTROL, "a")
    box.send_keys(Keys.BACKSPACE)  # WebElement.clear() would bypass the page's input events
    _click(browser, "compare")
    message = _wait_text(browser, "#compare_msg", "Type some text")
    assert "Traceback" not in browser.find_element(By.TAG_NAME, "body").text
    assert "Error" in message

    browser.find_element(By.CSS_SELECTOR, "#repo_id textarea").send_keys("tester/tiny-optin")
    browser.find_element(By.CSS_SELECTOR, "#token input").send_keys(FAKE_TOKEN)
    _click(browser, "push")
    _wait_text(browser, "#push_msg", "Pushed to")

    browser.save_screenshot(str(tmp_path / "space_app.png"))
    assert (tmp_path / "space_app.png").stat().st_size > 10_000


@needs_browser
def test_a_local_path_typed_by_a_visitor_is_refused_in_browser(url, browser, tmp_path):
    """The Space's host holds a model folder; a visitor typing its path gets a refusal, and no zip of its weights."""
    folder = _save_tiny_task(tmp_path / "data" / "model")
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prune"))
    _type_hub_model(browser, str(folder), "the movie was great\nthe plot was poor")
    _set_slider(browser, 1.0)  # the budget that keeps every unit: the attack's "prune" is a copy of the weights
    _click(browser, "prune")
    status = _wait_text(browser, "#status", "Error")
    assert f"The model '{folder}' is not a Hub repo id (name or org/name): only models on the Hub load here, never a " \
           "path on this machine." in status
    _click(browser, "zip")
    _wait_text(browser, "#push_msg", "Prune a model first")
    assert not browser.find_elements(By.CSS_SELECTOR, "#download a")  # nothing offered for download
    slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in str(folder))
    assert not [p for p in Path(tempfile.gettempdir()).glob("optin-space-*/*/*") if p.name.startswith(slug)]


@needs_browser
def test_a_private_repo_typed_by_a_visitor_is_refused_in_browser(url, browser, hub_server, tmp_path):
    """The Space process holds HF_TOKEN, which reads the private repo (and fetched it into the cache): a visitor's id
    is still asked of the Hub anonymously, and loads only with the visitor's own token."""
    repo_id = create_repo("private-bert", private=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=_save_tiny_task(tmp_path / "model"))
    assert os.environ["HF_TOKEN"] == FAKE_TOKEN
    assert load_model(repo_id)[0].name_or_path == repo_id  # with the Space's token it would load

    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prune"))
    _type_hub_model(browser, repo_id, "the movie was great\nthe plot was poor")
    _click(browser, "prune")
    status = _wait_text(browser, "#status", "Error")
    assert f"The model '{repo_id}' was not found on the Hub, or it is private or gated and an anonymous request " \
           "cannot read it (HTTP 401)." in status

    _type_hub_model(browser, repo_id, "the movie was great\nthe plot was poor", token=FAKE_TOKEN)
    _click(browser, "prune")
    assert f"Pruned {repo_id}" in _wait_text(browser, "#status", "Pruned", timeout=15)


@needs_browser
def test_a_segmenter_shows_its_masks_side_by_side_in_browser(url, browser):
    """A segmentation model's Prune shows mean IoU and the panel of image, ground truth, dense and pruned masks, in
    place of the class labels a classifier shows."""
    browser.get(url)
    WebDriverWait(browser, 30).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#prune"))
    _pick_model(browser, "tiny-segformer")
    _click(browser, "prune")
    assert "Pruned tiny-segformer" in _wait_text(browser, "#status", "Pruned")
    assert "mean iou" in _wait_text(browser, "#results", "MACs")
    WebDriverWait(browser, 10).until(lambda d: d.find_elements(By.CSS_SELECTOR, "#segmentation img, #segmentation svg"))
    assert browser.find_element(By.CSS_SELECTOR, "#segmentation").is_displayed()
    assert not [label for label in browser.find_elements(By.CSS_SELECTOR, "#dense_pred") if label.is_displayed()]
