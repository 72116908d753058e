"""OPTIN pruning demo: pick a model and a MAC budget, prune it, compare it with the dense model.

`build_demo(models)` takes named loaders, so the Space embeds every optin-hf default (classifiers,
a segmenter, a language model) and a test injects a tiny model. Scores are cached per model and
calibration settings: moving the budget slider re-allocates and re-slims a fresh copy of the dense
model without re-scoring.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import shutil
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gradio as gr
import numpy as np
import pandas as pd
import torch
from datasets import Dataset
from matplotlib.figure import Figure
from PIL import Image
from torch import nn
from transformers import GenerationConfig

from optin_hf import ImportanceScores, OptinConfig, OptinPruner
from optin_hf.criteria import AUTO_IMPORTANCE
from optin_hf.hub.download import check_hub_id, hub_commit
from optin_hf.tasks import report
from optin_hf.tasks.generation import GENERATED_TOKENS
from optin_hf.tasks.metrics import PERPLEXITY, load_metric
from optin_hf.tasks.names import CAUSAL_LM
from optin_hf.tasks.task_data import SEGMENTATION, Columns, Encoder, in_memory_task_data, label_encoder
from optin_hf.tasks.windows import calibration_windows
from optin_hf.tasks.workflow import load_model, task_metric

HUB_CHOICE = "Hub model id (below)"
HUB_TASKS = ("text-classification", "image-classification")
# Small enough for a free CPU Space; OptinConfig's own defaults are for offline runs. A press of
# Prune should answer within about 2 minutes on 2 cores: the scoring budget leaves the rest to
# slimming, evaluation and timing; the pruner picks the calibration size and neuron grouping that fit.
# A Hub model runs these; an embedded default runs its CLI recipe's settings, each of SPACE_CAPS at most the Space's.
# OPTIN is named (OptinConfig's default, importance="auto", prunes with every candidate recipe): the slider re-allocates
# its cached scores.
SPACE_SETTINGS = {"importance": "optin", "num_samples": 64, "batch_size": 32, "max_length": 128, "max_scoring_time": 45.0,
                  "reconstruct_samples": 128}
SPACE_CAPS = ("max_scoring_time", "reconstruct_samples")
# Defaults whose recipe, capped, still takes more than a press may run these instead (SmolLM2: 123 CPU s on one thread
# with 64-token windows, 104 s with these); the status line names every setting that differs. SmolLM2 keeps its
# recipe's refit selection: with the in-place greedy (refit_selection.greedy_removal) it adds about 59 CPU s to a
# press (165 CPU s on one thread in all); a press took 104 s on 2 threads at load 1.8 (benchmarks/space_press.py).
SPACE_LIGHTER: dict[str, dict[str, Any]] = {
    "shakespeare-smollm2": {"num_samples": 4, "max_length": 32, "neuron_group_size": 512},
}
# Metrics on a free 2-core Space: the first 300 held-out examples (the table says how many), dense measured once.
SPACE_TEST_EXAMPLES = 300
# A language model: at most this many of its held-out windows, and its tokens/s timed once after a warm-up (the
# forward at batch 16 alone costs SmolLM2 seconds on a CPU).
SPACE_LM_WINDOWS = 16
SPACE_LM_TIMING_RUNS = 1
SEGMENTATION_SCENES = 3  # test scenes the segmentation panel shows after a Prune


@dataclass
class DemoTask:
    """What the demo needs of a model (an embedded default's come from `optin_hf.tasks.defaults.DefaultTask`).

    processor: the tokenizer of a text model, None for images (datasets then hold `pixel_values`).
    test: labelled held-out rows (a language model's: held-out text), or None (no metric is then shown).
    settings: the OptinConfig fields of its CLI recipe (an embedded default's), None for the Space's own.
    lighter: the fields the Space runs instead of the recipe's (SPACE_LIGHTER).
    eval_window, max_eval_samples: a language model's evaluation windows, in tokens, and how many.
    """

    model: nn.Module
    processor: Any
    calibration: Dataset
    test: Dataset | None
    label_names: list[str]
    task: str
    settings: dict[str, Any] | None = None
    eval_window: int | None = None
    max_eval_samples: int | None = None
    lighter: dict[str, Any] = field(default_factory=dict)


Loader = Callable[[], DemoTask]


@dataclass
class CachedScores:
    """Scores with the settings that made them (what the time budget picked) and what was estimated."""

    scores: ImportanceScores
    seq_len: float
    seconds: float
    config: OptinConfig
    plan: str | None
    calibration: Any  # what was scored, reused by the refit: a Dataset, or a language model's token windows


@dataclass
class PruneResult:
    """One session's latest pruned model, kept for comparisons, download and push."""

    task_key: tuple
    pruner: OptinPruner
    model: nn.Module


def default_loaders() -> dict[str, Loader]:
    """Every embedded default of optin-hf's registry, in its order, each loaded on first use (the first load
    trains it, 1-3 CPU minutes, or de-quantizes a pretrained language model) with its CLI recipe's settings."""
    from optin_hf.tasks.defaults import DEFAULT_NAMES  # the training stack: imported only when the defaults are shown

    def loader(name: str) -> Loader:
        def load() -> DemoTask:
            from optin_hf.tasks.defaults import load_default
            from optin_hf.tasks.recipes import default_recipe

            settings = default_recipe(name).optin.to_dict()
            default = load_default(name)
            return DemoTask(default.model, default.processor, default.calibration, default.test, default.label_names,
                            default.task, settings, default.eval_window, default.max_eval_samples,
                            SPACE_LIGHTER.get(name, {}))

        return load

    return {name: loader(name) for name in DEFAULT_NAMES}


def default_budgets() -> dict[str, float]:
    """Each embedded default's MAC budget in its CLI recipe: the slider moves there when the default is picked."""
    from optin_hf.tasks.defaults import DEFAULT_NAMES
    from optin_hf.tasks.recipes import default_recipe

    return {name: default_recipe(name).optin.mac_constraint for name in DEFAULT_NAMES}


# ---- measurements (the application layer's, shown as the page's table) ------------------------


@torch.no_grad()
def _probabilities(model: nn.Module, inputs: dict[str, torch.Tensor]) -> torch.Tensor:
    return model.eval()(**inputs).logits.softmax(-1)


def results_table(measured: report.Report) -> pd.DataFrame:
    """Dense vs pruned main metric (accuracy, mean IoU or perplexity), MACs, parameters and latency of a
    `report.measure` result, as the page shows them."""
    dense, pruned = measured.stats["dense"], measured.stats["pruned"]
    ratios = measured.ratios()
    key = measured.main_metric
    values = [None if s.metrics is None else s.metrics[key] for s in (dense, pruned)]
    known = values[0] is not None and values[1] is not None
    if measured.metric == PERPLEXITY:  # no fraction, lower is better: the relative rise
        what = f"{key} ({measured.eval_samples} held-out windows of {measured.eval_window} tokens)"
        shown = [f"{v:.2f}" if v is not None else "n/a" for v in values]
        change = f"{100 * (values[1] / values[0] - 1):+.1f} %" if known else "n/a"
        macs = f"MACs per token ({measured.seq_len:.0f}-token context)"
    else:
        what = f"{key.replace('_', ' ')} ({measured.eval_samples if known else 0} test examples)"
        shown = [f"{100 * v:.1f} %" if v is not None else "n/a" for v in values]
        change = f"{100 * (values[1] - values[0]):+.1f} pt" if known else "n/a"
        macs = f"MACs per example ({measured.counted_at if measured.image_size else f'{measured.seq_len:.0f} tokens'})"
    rows = [
        [what, *shown, change],
        [macs, report.format_si(dense.macs), report.format_si(pruned.macs), f"{ratios['macs']:.2f}"],
        ["parameters", report.format_si(dense.parameters), report.format_si(pruned.parameters), f"{ratios['parameters']:.2f}"],
        [f"latency, batch of {measured.latency['batch_size']}", *(f"{1000 * s.latency_s:.1f} ms" for s in (dense, pruned)),
         f"{ratios['latency']:.2f}"],
    ]
    return pd.DataFrame(rows, columns=["", "dense", "pruned", "ratio"])


def digit_image(pixel_values: Any, size: int = 160) -> Image.Image:
    """A model input image, min-max scaled and enlarged without smoothing so 8x8 digits stay crisp."""
    array = np.asarray(pixel_values, dtype=np.float32)
    array = array.transpose(1, 2, 0) if array.ndim == 3 else array
    array = (array - array.min()) / max(float(array.max() - array.min()), 1e-6)
    image = Image.fromarray((255 * array.squeeze()).astype(np.uint8))
    return image.resize((size, size), Image.NEAREST)


def sample_prompt(task: DemoTask) -> str:
    """Two lines from the middle of the first held-out text (a speaker and a verse of a play): the prompt a
    language model's dense and pruned samples continue after a Prune."""
    text = task.test[0]["text"] if task.test is not None and len(task.test) else ""
    lines = [line for line in text.splitlines() if line.strip()]
    return "\n".join(lines[len(lines) // 2: len(lines) // 2 + 2]) + "\n"


@torch.no_grad()
def continuation(model: nn.Module, tokenizer: Any, prompt: str) -> str:
    """GENERATED_TOKENS greedy tokens after `prompt`: greedy, so dense and pruned differ by pruning, not by chance."""
    encoded = tokenizer(prompt, return_tensors="pt")
    inputs = {k: encoded[k] for k in ("input_ids", "attention_mask")}  # a BERT-style tokenizer's token types: no LM input
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    settings = GenerationConfig(max_new_tokens=GENERATED_TOKENS, do_sample=False, pad_token_id=pad)
    out = model.eval().generate(**inputs, generation_config=settings)
    return tokenizer.decode(out[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)


# ---- Hub models ------------------------------------------------------------------------------


def hub_loader(model_id: str, texts: str, dataset_id: str, samples: int, token: str = "") -> Loader:
    """A loader for any Hub text or image classifier that optin-hf supports (needs the network).

    Calibration comes from the pasted texts (one per line) or the first `samples` rows of a
    dataset's train split; accuracy is shown only when the dataset has a labelled test split.
    The ids are a visitor's: Hub ids only (never a path on the Space's disk), read anonymously
    or with the visitor's own `token`, never with the Space's HF_TOKEN.
    """
    read_token: str | bool = token.strip() or False  # False: huggingface_hub sends no token, not even HF_TOKEN

    def load() -> DemoTask:
        dataset = _dataset_id(dataset_id.strip()) if dataset_id.strip() else None  # refused before any download
        model, processor, task = load_model(model_id, hub_only=True, token=read_token)
        if task not in HUB_TASKS:
            raise ValueError(f"{model_id} is a {task} model; this Space prunes Hub text and image classifiers "
                             "(prune it with `optimum-cli optin prune`).")
        vision = task == "image-classification"
        if dataset:
            calibration, test = _hub_dataset(dataset, processor, vision, samples, read_token)
        elif vision:
            raise ValueError("An image model needs a dataset id (with an `image` column) to calibrate on.")
        else:
            lines = [line.strip() for line in texts.splitlines() if line.strip()]
            if not lines:
                raise ValueError("Give calibration texts (one per line) or a dataset id.")
            calibration, test = Dataset.from_dict({"text": lines}), None
        id2label = model.config.id2label
        labels = [id2label[i] for i in sorted(id2label)]
        return DemoTask(model, None if vision else processor, calibration, test, labels, task)

    return load


def _dataset_id(dataset_id: str) -> str:
    """A visitor's dataset id, checked on the string alone: datasets would read a local folder of that name, and a
    bare builder name (csv, text, imagefolder) reads this machine's files."""
    what = f"The dataset {dataset_id!r}"
    check_hub_id(dataset_id, what, "only datasets on the Hub load here, never a path on this machine.")
    if "/" not in dataset_id:
        raise ValueError(f"Give the dataset's full Hub id, org/name, not {dataset_id!r} (e.g. stanfordnlp/imdb).")
    return dataset_id


def _hub_dataset(
    dataset_id: str, processor: Any, vision: bool, samples: int, token: str | bool
) -> tuple[Dataset, Dataset | None]:
    from datasets import get_dataset_split_names, load_dataset

    what = f"The dataset {dataset_id!r}"
    revision = hub_commit(dataset_id, token=token, what=what, repo_type="dataset")  # the Hub decides, not the cache
    path = f"hf://datasets/{dataset_id}"  # the Hub's copy even if a folder of that name exists here
    try:
        splits = get_dataset_split_names(path, revision=revision, token=token)
    except Exception as err:  # datasets raises many kinds for a dataset it cannot read
        raise ValueError(f"Could not open {what}: {err}") from err
    calibration = load_dataset(path, split=f"{splits[0]}[:{samples}]", revision=revision, token=token)
    held_out = next((s for s in ("test", "validation") if s in splits), None)
    test = load_dataset(path, split=f"{held_out}[:{samples}]", revision=revision, token=token) if held_out else None
    if test is not None and "label" not in test.column_names:
        test = None
    if vision:
        calibration, test = (None if d is None else _pixel_rows(d, processor) for d in (calibration, test))
    return calibration, test


def _pixel_rows(dataset: Dataset, processor: Any) -> Dataset:
    if processor is None:
        raise ValueError("The model has no image processor on the Hub, so the dataset's images cannot be read for it.")
    column = next((c for c in ("image", "img") if c in dataset.column_names), None)
    if column is None:
        raise ValueError(f"The dataset has no `image` column: {dataset.column_names}.")
    pixels = processor(images=[im.convert("RGB") for im in dataset[column]], return_tensors="np")["pixel_values"]
    rows = {"pixel_values": list(pixels)}
    if "label" in dataset.column_names:
        rows["label"] = dataset["label"]
    return Dataset.from_dict(rows)


# ---- the app ---------------------------------------------------------------------------------


class SpaceApp:
    """The demo's state shared by all sessions: loaded models and their scores, kept in memory."""

    def __init__(self, models: dict[str, Loader], settings: dict[str, Any], workdir: Path):
        self.models = models
        self.settings = settings
        self.workdir = workdir
        self.tasks: dict[tuple, DemoTask] = {}
        self.scores: dict[tuple, CachedScores] = {}
        self.dense_metrics: dict[tuple, dict[str, float] | None] = {}

    def resolve(self, choice: str, model_id: str, texts: str, dataset_id: str, token: str = "") -> tuple[tuple, Loader]:
        """(cache key, loader) of the picked model; a Hub model's key includes its calibration data and the visitor's
        read token, so a private model loaded with one token is never handed to a session without it."""
        if choice != HUB_CHOICE:
            return ("named", choice), self.models[choice]
        if not model_id.strip():
            raise ValueError("Type a Hub model id, or pick an embedded model.")
        digest = hashlib.sha256(f"{texts}\n{dataset_id}\n{token.strip()}".encode()).hexdigest()[:12]
        loader = hub_loader(model_id.strip(), texts, dataset_id, self.settings["num_samples"], token)
        return ("hub", model_id.strip(), digest), loader

    def task(self, key: tuple, loader: Loader) -> DemoTask:
        if key not in self.tasks:
            self.tasks[key] = loader()
        return self.tasks[key]

    def settings_for(self, task: DemoTask) -> dict[str, Any]:
        """The OptinConfig fields a Prune of `task` runs with: an embedded default's CLI recipe, scored once
        (prune_steps 1: the slider re-allocates cached scores), its scoring time and refit examples at most the
        Space's (SPACE_CAPS), with the task's lighter settings (SPACE_LIGHTER), so a press answers within about 2
        minutes on 2 cores; else the Space's own."""
        if task.settings is None:
            return self.settings
        capped = {key: min((v for v in (task.settings.get(key), self.settings.get(key)) if v is not None), default=None)
                  for key in SPACE_CAPS}
        # importance="auto" prunes with every candidate recipe to choose one: the slider re-allocates one criterion's
        # cached scores instead, OPTIN's (named in the status line).
        searched = {"importance": "optin"} if task.settings.get("importance") == AUTO_IMPORTANCE else {}
        return {**task.settings, **capped, "prune_steps": 1, **searched, **task.lighter}

    def lighter(self, task: DemoTask) -> str:
        """Each setting `settings_for` runs other than the task's recipe, for the status line ("" if none); the
        budget is the slider's, and refit examples matter only to a repair."""
        if task.settings is None:
            return ""
        ran = self.settings_for(task)
        skip = {"mac_constraint", *(("reconstruct_samples",) if ran.get("reconstruct") == "none" else ())}
        changed = [f"{key}={_setting(ran[key])} (its recipe: {_setting(task.settings[key])})"
                   for key in ran if key not in skip and ran[key] != task.settings[key]]
        return f"Lighter than its CLI recipe here: {', '.join(changed)}." if changed else ""

    def measure(self, key: tuple, task: DemoTask, pruned: nn.Module, seq_len: float) -> report.Report:
        """Dense vs pruned on the first SPACE_TEST_EXAMPLES test examples (a language model: its recipe's held-out
        windows, at most SPACE_LM_WINDOWS); the dense model is evaluated once."""
        language = task.task == CAUSAL_LM
        most = SPACE_LM_WINDOWS if language else SPACE_TEST_EXAMPLES
        limit = min(task.max_eval_samples or most, most)
        window = task.eval_window or self.settings_for(task)["max_length"]  # a language model's windows: its recipe's
        data = in_memory_task_data(task.task, task.calibration, task.test, max_eval_samples=limit)
        measured = report.measure(
            {"dense": task.model, "pruned": pruned},
            name=str(key[1]),
            data=data,
            encoder=Encoder(task.task, data.columns, task.processor, window),
            labels=label_encoder(data, task.model.config),
            metric=load_metric(task_metric(None, task.task), offline=True),  # the local formula: no Hub round trip
            seq_len=seq_len,
            runs=SPACE_LM_TIMING_RUNS if language else report.LATENCY_RUNS,
            known_metrics={"dense": self.dense_metrics[key]} if key in self.dense_metrics else None,
        )
        self.dense_metrics[key] = measured.stats["dense"].metrics
        return measured

    def calibration(self, task: DemoTask, config: OptinConfig) -> Any:
        """What scoring and the refit read: the calibration split as it is (the pruner encodes its first rows), or
        a language model's token windows, drawn as the CLI draws them (`tasks.windows`)."""
        if task.task != CAUSAL_LM:
            return task.calibration
        wanted = max(config.num_samples, config.reconstruct_samples if config.reconstruct != "none" else 0)
        column = in_memory_task_data(task.task, task.calibration, None).columns.inputs[0]
        return calibration_windows(task.calibration, column, task.processor, config.max_length, wanted, config.seed)

    def cached_scores(self, key: tuple, task: DemoTask) -> tuple[CachedScores, bool]:
        """(scores, reused): scoring runs once per model and calibration settings."""
        settings = self.settings_for(task)
        score_key = (key, json.dumps(settings, sort_keys=True, default=str))
        if score_key in self.scores:
            return self.scores[score_key], True
        config = OptinConfig(**settings)
        calibration = self.calibration(task, config)
        pruner = OptinPruner(config)
        start = time.perf_counter()
        scores = pruner.compute_scores(task.model, calibration, tokenizer=task.processor)
        plan = None if pruner.plan is None else str(pruner.plan)
        self.scores[score_key] = CachedScores(scores, pruner.seq_len, time.perf_counter() - start, pruner.config, plan,
                                              calibration)
        return self.scores[score_key], False

    def prune(self, key: tuple, task: DemoTask, budget: float) -> tuple[PruneResult, CachedScores, bool]:
        """Allocate `budget` from the (cached) scores and slim a copy of the dense model."""
        cached, reused = self.cached_scores(key, task)
        pruner = OptinPruner(dataclasses.replace(cached.config, mac_constraint=budget, seq_len=cached.seq_len))
        model = copy.deepcopy(task.model)
        # the calibration data too: a recipe's allocation="refit" measures refit cuts on it
        masks = pruner.compute_masks(model, cached.calibration, scores=cached.scores, tokenizer=task.processor)
        pruner.prune_model(model, cached.calibration, masks=masks, tokenizer=task.processor)
        return PruneResult(key, pruner, model), cached, reused

    def segmentation_panel(self, task: DemoTask, pruned: nn.Module, first: int, count: int) -> Figure:
        """Test scenes `first`.. (`count` of them): image, ground truth, dense and pruned masks side by side, the
        report's own drawing (`optin_segmentation.png` of the CLI)."""
        rows = task.test.select(range(first, min(first + count, len(task.test))))
        data = in_memory_task_data(task.task, None, rows)
        encoder = Encoder(task.task, data.columns, task.processor, None)
        return report.segmentation_figure({"dense": task.model, "pruned": pruned}, data, encoder,
                                          label_encoder(data, task.model.config), examples=len(rows))

    def checkpoint_zip(self, result: PruneResult, name: str) -> Path:
        """The pruned checkpoint as a zip under the app's temp folder (Gradio serves files from there)."""
        slug = "".join(c if c.isalnum() or c in "-_." else "-" for c in name)
        folder = Path(tempfile.mkdtemp(dir=self.workdir)) / f"{slug}-optin-{result.pruner.config.mac_constraint:.2f}"
        result.pruner.save(result.model, folder)
        return Path(shutil.make_archive(str(folder), "zip", folder))


def _error(err: Exception) -> str:
    """A one-line, readable message for the page (and a toast): never a traceback."""
    message = str(err).strip() or type(err).__name__
    gr.Warning(message)
    return f"**Error:** {message}"


def build_demo(models: dict[str, Loader] | None = None, settings: dict[str, Any] | None = None) -> gr.Blocks:
    """The Gradio page. `models`: named loaders (default: every embedded default of optin-hf);
    `settings`: OptinConfig fields other than the budget (default: SPACE_SETTINGS)."""
    app = SpaceApp(models or default_loaders(), {**SPACE_SETTINGS, **(settings or {})},
                   Path(tempfile.mkdtemp(prefix="optin-space-")))
    budgets = {} if models else default_budgets()
    first = next(iter(app.models))
    scoring_s = app.settings.get("max_scoring_time")
    with gr.Blocks(title="OPTIN pruning") as demo:
        gr.Markdown(
            "# ✂️ OPTIN: prune a transformer in one shot\n"
            "Retraining-free structured pruning ([OPTIN, ICLR 2024](https://arxiv.org/abs/2403.17921)) with "
            "**optin-hf**: heads, FFN neurons and convolution channels are scored by how much removing them disturbs "
            "later layers, the best are kept under a MAC budget, the model is physically slimmed, and the layers "
            "that follow are repaired (a least-squares refit of each sublayer's output projection where the family "
            "has one) to rebuild the dense model's outputs.\n\n"
            "Every embedded default runs the settings of its `optimum-cli optin prune --default` recipe, lighter "
            "where the recipe asks for more than a free 2-core Space gives one press: scored once (so the slider "
            "re-uses the scores)"
            + (f", within {scoring_s:.0f} s of scoring" if scoring_s else "")
            + (f", refit on at most {refit} calibration examples" if (refit := app.settings.get("reconstruct_samples"))
               else "")
            + ". Its first use trains it (1-3 CPU minutes; the language model is de-quantized instead)."
        )
        result_state = gr.State(None)
        with gr.Row():
            with gr.Column(scale=2):
                model_choice = gr.Dropdown([*app.models, HUB_CHOICE], value=first, label="Model", elem_id="model")
                budget = gr.Slider(0.2, 1.0, value=budgets.get(first, 0.6), step=0.05,
                                   label="MAC budget (fraction of the dense MACs to keep)", elem_id="budget")
                prune_btn = gr.Button("Prune", variant="primary", elem_id="prune")
            with gr.Column(scale=3):
                with gr.Accordion("Any Hub text or image classifier (BERT, RoBERTa, DistilBERT, ViT, DeiT; needs network)",
                                  open=False, elem_id="hub_box"):
                    hub_id = gr.Textbox(label="Hub model id", placeholder="e.g. textattack/bert-base-uncased-SST-2",
                                        elem_id="hub_id")
                    hub_texts = gr.Textbox(label="Calibration texts, one per line", lines=3, elem_id="hub_texts")
                    hub_dataset = gr.Textbox(label="…or a dataset id (train split calibrates; test split, if labelled, "
                                                   "measures accuracy)", elem_id="hub_dataset")
                    read_token = gr.Textbox(label="Hub read token (optional: for your private model or dataset; "
                                                  "without one, only public repos load)", type="password",
                                            elem_id="read_token")
                status = gr.Markdown("Pick a model and a budget, then press **Prune**.", elem_id="status")
        with gr.Row():
            table = gr.Dataframe(label="Dense vs pruned (ratio = pruned / dense)", elem_id="results", interactive=False,
                                 wrap=True, scale=5)
            chart = gr.Plot(label="Kept per layer", show_label=False, elem_id="chart", scale=6)
        gr.Markdown("### Compare predictions")
        with gr.Row():
            with gr.Column(visible=True) as text_box:
                text = gr.Textbox(label="Text", lines=3, elem_id="inp")
            with gr.Column(visible=False) as image_box:
                example = gr.Slider(0, 1, value=0, step=1, label="Test image #", elem_id="example")
                image = gr.Image(label="Input", height=180, width=180, interactive=False, elem_id="image")
            compare_btn = gr.Button("Compare dense and pruned", elem_id="compare")
        compare_msg = gr.Markdown("", elem_id="compare_msg")
        with gr.Row(visible=True) as label_box:
            dense_pred = gr.Label(num_top_classes=3, label="Dense prediction", elem_id="dense_pred")
            pruned_pred = gr.Label(num_top_classes=3, label="Pruned prediction", elem_id="pruned_pred")
        with gr.Row(visible=False) as sample_box:
            dense_sample = gr.Textbox(label="Dense continuation (greedy)", lines=4, interactive=False,
                                      elem_id="dense_sample")
            pruned_sample = gr.Textbox(label="Pruned continuation (greedy)", lines=4, interactive=False,
                                       elem_id="pruned_sample")
        with gr.Row(visible=False) as segmentation_box:
            segmentation = gr.Plot(label="Image, ground truth, dense and pruned masks", elem_id="segmentation")
        gr.Markdown("### Take the pruned model")
        with gr.Row():
            download_btn = gr.Button("Zip the pruned checkpoint", elem_id="zip")
            download = gr.File(label="Pruned checkpoint (.zip)", elem_id="download", height=70)
        with gr.Row():
            repo_id = gr.Textbox(label="Hub repo id", placeholder="you/model-optin", elem_id="repo_id")
            token = gr.Textbox(label="Hub write token", type="password", elem_id="token")
            masks_only = gr.Checkbox(value=False, label="masks only (small; needs a base model on the Hub)")
            push_btn = gr.Button("Push to the Hub", elem_id="push")
        push_msg = gr.Markdown("", elem_id="push_msg")

        def on_prune(choice, fraction, model_id, texts, dataset_id, secret, progress=gr.Progress(track_tqdm=True)):
            try:
                key, loader = app.resolve(choice, model_id or "", texts or "", dataset_id or "", secret or "")
                progress(0.0, desc=f"Loading {key[1]}")
                task = app.task(key, loader)
                budget_s = app.settings_for(task).get("max_scoring_time")
                within = f", within about {budget_s:.0f} s" if budget_s else ""
                progress(0.05, desc=f"Scoring heads, neurons or channels (once per model{within})")
                start = time.perf_counter()
                result, cached, reused = app.prune(key, task, float(fraction))
                slim_s = time.perf_counter() - start
                progress(0.8, desc="Measuring dense and pruned")
                measured = app.measure(key, task, result.model, cached.seq_len)
                frame = results_table(measured)
                shown = {text: gr.update(label="Text")}
                if task.task == SEGMENTATION:
                    shown[segmentation] = app.segmentation_panel(task, result.model, 0, SEGMENTATION_SCENES)
                elif task.task == CAUSAL_LM:
                    progress(0.95, desc="Generating a sample from each")
                    prompt = sample_prompt(task)
                    shown.update({text: gr.update(value=prompt, label="Prompt"),
                                  dense_sample: continuation(task.model, task.processor, prompt),
                                  pruned_sample: continuation(result.model, task.processor, prompt)})
            except Exception as err:  # every failure becomes a message on the page
                return {status: _error(err)}
            dense = measured.stats["dense"]  # each layer's own units (a mask pads ragged stages) in the family's words
            counts = zip((sum(dense.heads_per_layer), sum(dense.neurons_per_layer)), measured.unit_names)
            units = " and ".join(f"{count} {name}" for count, name in counts if count)
            how = (f"♻️ **Scores reused** from the cache (scored once in {cached.seconds:.1f} s): re-allocated and "
                   f"slimmed in {slim_s:.2f} s." if reused else
                   f"Scored {units} in {cached.seconds:.1f} s; moving the slider now re-uses these scores.")
            if cached.plan and not reused:
                how += f"\n\n⏱️ {cached.plan}."
            if app.lighter(task):
                how += f"\n\n{app.lighter(task)}"
            pictures = task.task in (SEGMENTATION, "image-classification")
            n_test = len(task.test) if task.test is not None else 0
            return {
                status: f"Pruned **{key[1]}** to {fraction:.2f} of its MACs. {how}",
                table: frame,
                chart: measured.figure(),  # the report's own drawing: each layer's dense width, the metric vs MACs
                result_state: result,
                text_box: gr.update(visible=not pictures),
                image_box: gr.update(visible=pictures),
                image: gr.update(visible=task.task == "image-classification"),  # the segmentation panel shows its own
                label_box: gr.update(visible=task.task in HUB_TASKS),
                sample_box: gr.update(visible=task.task == CAUSAL_LM),
                segmentation_box: gr.update(visible=task.task == SEGMENTATION),
                # Gradio refuses a slider whose maximum is its minimum (the whole update fails): at least 1, even for
                # a text model without test rows; on_compare names an index past the last image.
                example: gr.update(maximum=max(n_test - 1, 1), label="Test scene #" if task.task == SEGMENTATION
                                   else "Test image #"),
                download: None,
                **shown,
            }

        def on_compare(result, sentence, index):
            try:
                if result is None:
                    raise ValueError("Prune a model first.")
                task = app.tasks[result.task_key]
                if task.task == CAUSAL_LM:
                    if not (sentence or "").strip():
                        raise ValueError("Type a prompt to compare the dense and pruned continuations.")
                    samples = [continuation(m, task.processor, sentence) for m in (task.model, result.model)]
                    same = "Same continuation." if samples[0] == samples[1] else "The continuations differ."
                    return {dense_sample: samples[0], pruned_sample: samples[1], compare_msg: same}
                if task.processor is None and (task.test is None or int(index) >= len(task.test)):
                    raise ValueError("This model has no test image of that number to pick from.")
                if task.task == SEGMENTATION:
                    return {segmentation: app.segmentation_panel(task, result.model, int(index), 1),
                            compare_msg: f"Test scene #{int(index)}."}
                if task.processor is not None:
                    if not (sentence or "").strip():
                        raise ValueError("Type some text to compare the dense and pruned predictions.")
                    encoder = Encoder(task.task, Columns(("text",), "label"), task.processor,
                                      result.pruner.config.max_length)
                    inputs, shown, truth = encoder.batch([{"text": sentence}]), None, ""
                else:
                    row = task.test[int(index)]
                    inputs = {"pixel_values": torch.as_tensor(np.asarray(row["pixel_values"]), dtype=torch.float32)[None]}
                    shown = digit_image(row["pixel_values"])
                    truth = f"True label: **{task.label_names[row['label']]}**. " if "label" in row else ""
                labels = [_label(dict(enumerate(task.label_names)), p) for p in
                          (_probabilities(task.model, inputs)[0], _probabilities(result.model, inputs)[0])]
            except Exception as err:
                return {compare_msg: _error(err)}
            same = max(labels[0], key=labels[0].get) == max(labels[1], key=labels[1].get)
            return {dense_pred: labels[0], pruned_pred: labels[1], image: shown,
                    compare_msg: truth + ("Same top class." if same else "⚠️ The pruned model's top class differs.")}

        def on_zip(result):
            try:
                if result is None:
                    raise ValueError("Prune a model first.")
                return {download: str(app.checkpoint_zip(result, str(result.task_key[1]))), push_msg: ""}
            except Exception as err:
                return {push_msg: _error(err)}

        def on_push(result, repo, secret, small):
            try:
                if result is None:
                    raise ValueError("Prune a model first.")
                if not (repo or "").strip() or not (secret or "").strip():
                    raise ValueError("Give a Hub repo id and a write token to push.")
                try:
                    from optin_hf.hub import push_to_hub
                except ImportError as err:
                    raise ValueError(f"Pushing needs optin_hf.hub, which this install lacks ({err}).") from err
                info = push_to_hub(result.model, repo.strip(), scores=result.pruner.scores, masks_only=bool(small),
                                   token=secret.strip())
            except Exception as err:
                return {push_msg: _error(err)}
            return {push_msg: f"Pushed to [{repo.strip()}]({getattr(info, 'commit_url', '') or repo.strip()})."}

        def on_pick(choice):  # an embedded default's own budget; others keep the slider where it is
            return gr.update(value=budgets[choice]) if choice in budgets else gr.update()

        model_choice.change(on_pick, [model_choice], [budget])
        prune_btn.click(on_prune, [model_choice, budget, hub_id, hub_texts, hub_dataset, read_token],
                        {status, table, chart, result_state, text_box, image_box, label_box, sample_box, segmentation_box,
                         image, example, download, segmentation, text, dense_sample, pruned_sample})
        compare_btn.click(on_compare, [result_state, text, example],
                          {dense_pred, pruned_pred, image, compare_msg, dense_sample, pruned_sample, segmentation})
        download_btn.click(on_zip, [result_state], {download, push_msg})
        push_btn.click(on_push, [result_state, repo_id, token, masks_only], {push_msg})
    return demo


def _setting(value: Any) -> str:
    """An OptinConfig value as a recipe writes it: 45 not 45.0, none for None."""
    if value is None:
        return "none"
    return f"{value:g}" if isinstance(value, (int, float)) and not isinstance(value, bool) else str(value)


def _label(names: dict[int, str], probabilities: torch.Tensor) -> dict[str, float]:
    return {names.get(i, str(i)): float(p) for i, p in enumerate(probabilities)}


if __name__ == "__main__":
    build_demo().launch()
