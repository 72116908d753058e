"""The end-to-end runs behind the CLI and the recipes: load -> prune -> save -> report, and evaluate.

A `PruneJob` is one run written down; CLI flags and recipe files both become one, so the two
front ends cannot drift apart.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..arch import get_adapter
from ..checkpoint import MODEL_CONFIG_NAME, check_save_target, load_supported_config
from ..config import OptinConfig, check_field_types
from ..data import evaluation_max_length
from ..hub.download import PROCESSOR_FILES, download_model
from ..masks import MASKS_NAME
from .metrics import DEFAULT_METRIC, PERPLEXITY, SEGMENTATION_METRIC, Metric, load_metric, metric_names
from .names import CAUSAL_LM, CAUSAL_LM_HEADS, SEGMENTATION_HEADS, TASKS, TEXT_TASKS, model_class
from .report import REPORT_JSON, SEGMENTATION_PNG, Report, measure, plot_segmentations
from .task_data import (
    SEGMENTATION,
    DataSpec,
    Encoder,
    LabelEncoder,
    TaskData,
    in_memory_task_data,
    label_encoder,
    load_task_data,
)
from .windows import calibration_windows, check_window

DEFAULT_TEXT_MODEL = "bbc-news"


@dataclass
class PruneJob:
    """One pruning run: an embedded `default`, or a `model` with its `data`.

    Every field is type-checked as `OptinConfig`'s are (CLI flags and recipe keys alike), so a recipe's
    `push_full: "false"` or `model: [name]` is refused, naming the key, instead of read as truthy.
    """

    optin: OptinConfig
    output: Path | None = None
    default: str | None = None
    model: str | None = None
    task: str | None = None
    data: DataSpec | None = None
    processor: str | None = None
    metric: str | None = None  # None: the task's (mean_iou for segmentation, else accuracy)
    push_to_hub: str | None = None
    push_full: bool = False
    device: str | None = None
    overwrite: bool = False

    def __post_init__(self) -> None:
        check_field_types(self)
        empty = [f.name for f in dataclasses.fields(self) if getattr(self, f.name) == ""]
        if empty:  # "" would fall back to a default silently: no push, the embedded model, the model's processor
            raise ValueError(f"{empty[0]}='' is empty: give a value, or leave it out.")
        if self.default and self.model:
            raise ValueError("Give either an embedded default or a model, not both.")
        if self.model and self.data is None:
            raise ValueError("A model needs calibration data: give a dataset (--dataset).")
        if self.default and (self.data is not None or self.processor or self.task):
            raise ValueError("An embedded default brings its own data, processor and task; drop the dataset/processor/task.")
        if self.task is not None and self.task not in TASKS:
            raise ValueError(f"Unknown task {self.task!r}; choose one of {list(TASKS)}.")
        if self.push_full and not self.push_to_hub:
            raise ValueError("--full only applies with --push-to-hub.")
        if not self.model and not self.default:
            self.default = DEFAULT_TEXT_MODEL
        if self.output is None:
            base = self.default or Path(self.model.rstrip("/")).name
            self.output = Path(f"{base}-optin-{self.optin.mac_constraint}")
        self.output = Path(self.output)
        check_save_target(self.output, self.overwrite)  # before the run, not after it


@dataclass
class Loaded:
    """A model ready to prune or evaluate, with its processor and data."""

    name: str
    source: str
    model: nn.Module
    processor: Any
    data: TaskData


def resolve_device(name: str | None) -> torch.device:
    """`name`, or the GPU when there is one: scoring runs one forward pass per head and neuron."""
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except RuntimeError as err:
        raise ValueError(f"Unknown device {name!r} (e.g. cpu, cuda, cuda:1).") from err
    if device.type not in ("cpu", "cuda") and not (device.type == "mps" and torch.backends.mps.is_available()):
        # "meta" holds no data, and an accelerator torch lacks fails deep inside the model's .to()
        raise ValueError(f"Device {name!r} cannot run a model here: use cpu or cuda (mps on a Mac with Metal).")
    if device.type == "cuda" and (device.index or 0) >= torch.cuda.device_count():
        raise ValueError(f"Device {name!r} asked for, but torch sees {torch.cuda.device_count()} CUDA GPU(s) here.")
    return device


def load_default_task(name: str) -> Loaded:
    """An embedded default (fine-tuned on first use by `optin_hf.tasks.defaults`) with its splits."""
    from .defaults import DEFAULT_NAMES, load_default  # heavy: only when a default is asked for

    if name not in DEFAULT_NAMES:
        raise ValueError(f"Unknown embedded default {name!r}; choose one of {list(DEFAULT_NAMES)}.")
    task = load_default(name)
    data = in_memory_task_data(task.task, task.calibration, task.test, {"default": name}, task.max_eval_samples, task.eval_window)
    return Loaded(f"{name} (embedded default)", str(task.model_dir), task.model, task.processor, data)


def task_of(config) -> str:
    """The task a model's config says it does: segmentation for a `...ForSemanticSegmentation` or
    `...ForUniversalSegmentation` (Mask2Former), text generation for a `...ForCausalLM` or
    `...LMHeadModel` (GPT-2), image classification for other vision models, else text classification."""
    architectures = getattr(config, "architectures", None) or ()
    if any(name.endswith(SEGMENTATION_HEADS) for name in architectures):
        return SEGMENTATION
    if any(name.endswith(CAUSAL_LM_HEADS) for name in architectures):
        return CAUSAL_LM
    return "image-classification" if get_adapter(config).is_vision else "text-classification"


def task_metric(name: str | None, task: str) -> str:
    """The metric to report: `name`, or the task's own; mean IoU for segmentation and only there,
    perplexity for a language model and only there."""
    own = {SEGMENTATION: SEGMENTATION_METRIC, CAUSAL_LM: PERPLEXITY}
    if name is None:
        return own.get(task, DEFAULT_METRIC)
    if own.get(task) != name and (task in own or name in own.values()):
        raise ValueError(f"Metric {name} does not fit the task {task}: segmentation is measured by {SEGMENTATION_METRIC}, "
                         f"a language model ({CAUSAL_LM}) by {PERPLEXITY}, classification by accuracy or glue/<task>.")
    return name


def _size_images(model: nn.Module, processor: Any) -> None:
    """Count a segmentation model's MACs (and time it) at the size its image processor resizes to.

    A SegFormer config may have no `image_size`: it gets the processor's. A Mask2Former's MACs are
    its Swin backbone's at `backbone_config.image_size`, which is Swin's default 224 whatever the
    model is fed (ADE20K's processor: 384x384; the backbone runs any size), so the processor's
    size replaces it.
    """
    size = getattr(processor, "size", None) or {}
    if "height" not in size or "width" not in size or size["height"] is None or size["width"] is None:
        return
    shape = (int(size["height"]), int(size["width"]))
    backbone = getattr(model.config, "backbone_config", None)
    if backbone is not None and hasattr(backbone, "image_size"):
        backbone.image_size = shape
    elif getattr(model.config, "image_size", None) is None:
        model.config.image_size = shape


def load_model(
    name_or_path: str,
    task: str | None = None,
    processor: str | None = None,
    *,
    hub_only: bool = False,
    token: str | bool | None = None,
) -> tuple[nn.Module, Any, str]:
    """A dense model for `task` (inferred from its config when None), its processor, and the task.

    Only safetensors weights of a supported architecture load: a pickled .bin file can run code when unpickled.
    The model (and `processor`) resolve through `optin_hf.hub.download.download_model`, a local folder or a Hub
    repo's snapshot, so a missing folder or an unreachable id is named alike from every entry point. `hub_only` and
    `token` are for names typed by someone else (the Space): a Hub id only, read with `token` and not HF_TOKEN.
    """
    folder = download_model(name_or_path, hub_only=hub_only, token=token)
    if not (folder / MODEL_CONFIG_NAME).is_file():
        raise FileNotFoundError(
            f"{name_or_path} has no {MODEL_CONFIG_NAME}: it is not a transformers model (a folder save_pretrained "
            "wrote, or a model repo on the Hub)."
        )
    config = load_supported_config(folder, name_or_path)
    task = task or task_of(config)
    try:
        model = model_class(task, config).from_pretrained(
            str(folder), config=config, use_safetensors=True, trust_remote_code=False
        )
    except OSError as err:
        if "safetensors" not in str(err):
            raise
        raise OSError(
            f"{name_or_path} has no safetensors weights (model.safetensors): optin-hf never loads pickled .bin "
            "weights, since unpickling can run code. Convert them once, only if you trust the file: "
            f"transformers.{model_class(task, config).__name__}.from_pretrained(PATH).save_pretrained(NEW_PATH) writes safetensors."
        ) from err
    # The name given, not the snapshot folder in the Hub cache: a pruned model records it as its base model.
    model.name_or_path = model.config.name_or_path = name_or_path
    if processor is not None:
        folder = download_model(processor, PROCESSOR_FILES, hub_only=hub_only, token=token)
    loaded_processor = load_processor(folder, task)
    if task == SEGMENTATION:
        _size_images(model, loaded_processor)
    return model.eval(), loaded_processor, task


def load_processor(folder: str | Path, task: str) -> Any:
    """The tokenizer, or the image processor (None if there is none: data may hold pixel_values), of a local folder
    (a Hub processor is fetched by `download_model` first)."""
    import transformers

    if task in TEXT_TASKS:
        return transformers.AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    try:
        return transformers.AutoImageProcessor.from_pretrained(folder, trust_remote_code=False)
    except OSError:
        return None


def _check_metric(metric: Metric, model: nn.Module) -> None:
    """Refuse a metric whose numbers would mean nothing for this model, before any data loads."""
    if metric.name == PERPLEXITY:  # no labels: a text predicts its own next tokens (`task_metric` pairs it with the task)
        return
    labels = model.config.num_labels
    if metric.regression != (labels == 1):
        raise ValueError(
            f"Metric {metric.name} does not fit a model with {labels} label(s): "
            "regression models (one output) need glue/stsb, classifiers another metric."
        )
    if metric.binary and labels != 2:
        raise ValueError(
            f"Metric {metric.name} scores the binary F1 of class 1, which needs a model with 2 labels, and this one "
            f"has num_labels={labels}: use --metric accuracy (or a glue/<task> metric made for {labels} classes)."
        )


def _with_labels(examples: list[dict[str, torch.Tensor]], rows: list[dict[str, Any]], data: TaskData, model: nn.Module) -> list:
    """The calibration examples with their rows' labels in the model's class order, for criteria
    that use labels; unchanged when the split has unlabelled rows (None, or -1 as in GLUE's test splits)."""
    values = [row.get(data.columns.label) for row in rows]
    if data.task == SEGMENTATION:  # a class map per image, at another resolution than the logits
        return examples
    if any(v is None or (isinstance(v, int) and v < 0) for v in values):
        return examples
    encode = LabelEncoder((getattr(data.calibration, "features", None) or {}).get(data.columns.label), model.config)
    return [{**ex, "labels": torch.as_tensor(y)} for ex, y in zip(examples, encode(values))]


def load_job(job: PruneJob) -> tuple[Loaded, Metric]:
    """The job's model, data and metric; the metric is checked against the model before any data loads."""
    if job.metric is not None:
        load_metric(job.metric)  # an unknown name fails before the model loads
    if job.default:
        loaded = load_default_task(job.default)
        metric = load_metric(task_metric(job.metric, loaded.data.task))
        _check_metric(metric, loaded.model)
        return loaded, metric
    model, processor, task = load_model(job.model, job.task, job.processor)
    metric = load_metric(task_metric(job.metric, task))
    _check_metric(metric, model)
    return Loaded(job.model, job.model, model, processor, load_task_data(job.data, task)), metric


def run_prune(job: PruneJob) -> Report:
    """Prune, save to `job.output` (with the processor and the report), optionally push; return the report."""
    from ..importance import CRITERIA
    from ..pruner import OptinPruner
    from .task_data import calibration_rows

    device = resolve_device(job.device)
    loaded, metric = load_job(job)
    model, data = loaded.model.to(device), loaded.data
    config = job.optin
    if config.base_model_name_or_path is None:
        config = dataclasses.replace(config, base_model_name_or_path=loaded.source)
    encoder = Encoder(data.task, data.columns, loaded.processor, config.max_length)
    # Scoring reads the first num_samples rows, reconstruction the first reconstruct_samples.
    wanted = max(config.num_samples, config.reconstruct_samples if config.reconstruct != "none" else 0)
    window = evaluation_max_length(config.max_length, model.config)
    if data.task == CAUSAL_LM:  # windows of max_length tokens drawn from the calibration text (`tasks.windows`)
        window = check_window(data.eval_window or config.max_length, model.config)
        calibration = calibration_windows(data.calibration, data.columns.inputs[0], loaded.processor, config.max_length,
                                          wanted, config.seed)
    else:
        rows = calibration_rows(data.calibration, wanted, config.seed)
        calibration = encoder.examples(rows)
        if getattr(CRITERIA[config.importance], "needs_labels", False):
            calibration = _with_labels(calibration, rows, data, model)
    evaluation = Encoder(data.task, data.columns, loaded.processor, window)
    labels = label_encoder(data, model.config, loaded.processor)
    dense = copy.deepcopy(model)
    pruner = OptinPruner(config)
    start = time.perf_counter()
    pruner.prune_model(model, calibration, dense=dense)  # the report's dense copy is the refit's too
    timings = {"total_s": time.perf_counter() - start, **pruner.timings}
    pruner.save(model, job.output, overwrite=job.overwrite)
    if loaded.processor is not None:
        loaded.processor.save_pretrained(job.output)
    report = measure(
        {"dense": dense, "pruned": model},
        name=loaded.name,
        data=data,
        encoder=evaluation,
        labels=labels,
        metric=metric,
        seq_len=pruner.seq_len,
        optin=pruner.config.to_dict(),  # the settings used: a scoring time budget may have picked some
        timings=timings,
    )
    report.save(job.output)
    if data.task == SEGMENTATION and labels is not None:
        plot_segmentations({"dense": dense, "pruned": model}, data, evaluation, labels, job.output / SEGMENTATION_PNG)
    if job.push_to_hub:
        from ..hub import push_to_hub

        push_to_hub(model, job.push_to_hub, scores=pruner.scores, masks_only=not job.push_full)
    return report


@dataclass(frozen=True)
class Recorded:
    """What the report `optin prune` left in a folder names for `optin evaluate` to reuse: its data and metric."""

    metric: str | None = None
    default: str | None = None
    dataset: DataSpec | None = None

    def __post_init__(self) -> None:
        check_field_types(self)
        if self.metric is not None and self.metric not in metric_names():
            raise ValueError(f"metric={self.metric!r} is unknown; optin-hf writes one of {metric_names()}")


def _recorded(folder: Path) -> Recorded:
    """The data and metric of the report in `folder` (Nones when there is none), checked as any input is:
    the file may be hand-edited or not optin-hf's, and a wrong shape must not surface as a traceback."""
    path = folder / REPORT_JSON
    if not path.is_file():
        return Recorded()
    try:
        report = json.loads(path.read_text())
        if not isinstance(report, dict):
            raise ValueError(f"it holds a JSON {type(report).__name__}, not an object")
        data = report.get("data", {})
        if not isinstance(data, dict):
            raise ValueError(f"its data is {data!r}, not a mapping")
        dataset = data.get("dataset")
        return Recorded(report.get("metric"), data.get("default"), DataSpec.from_dict(dataset) if isinstance(dataset, dict) else dataset)
    except (ValueError, TypeError) as err:  # json.JSONDecodeError is a ValueError
        raise ValueError(
            f"{path} is not a report optin-hf can read ({err}): give --dataset (or --default) and --metric, or fix the file."
        ) from err


def run_evaluate(
    model_path: str,
    data: DataSpec | None = None,
    default: str | None = None,
    task: str | None = None,
    metric_name: str | None = None,
    max_length: int | None = None,
    device: str | None = None,
) -> Report:
    """Evaluate and time one model: a folder written by `optin prune`, or any dense model.

    Without `data` or `default`, the data recorded in the folder's report is used again, and
    without `metric_name` its metric (else the task's); without `max_length`, a pruned model's
    own calibration truncation. A language model's `max_length` is its evaluation window (`tasks.windows`);
    without it, the data's own window (an embedded default's, a dataset's `eval_window`), else as above.
    """
    from ..modeling import AutoOptinModel

    if data is not None and default:
        raise ValueError("Give either a dataset or an embedded default to evaluate on, not both.")
    if max_length is not None and not max_length >= 1:  # 0 would read as "not given", a negative fail in the tokenizer
        raise ValueError(f"max_length={max_length} must be a positive integer (or left out: the pruning run's).")
    folder = Path(model_path)
    given_length = max_length
    pruned = (folder / MASKS_NAME).is_file()
    if pruned:
        model = AutoOptinModel.from_pretrained(folder)
        task = task or task_of(model.config)
        processor = load_processor(str(folder), task)
        if task == SEGMENTATION:
            _size_images(model, processor)
        max_length = max_length or OptinConfig.from_pretrained(folder).max_length
    else:
        model, processor, task = load_model(model_path, task)
    given_data = data is not None or default is not None
    recorded = Recorded() if given_data and metric_name is not None else _recorded(folder)  # read only when needed
    if not given_data:
        if recorded.default is None and recorded.dataset is None:
            raise ValueError(f"No evaluation data given, and {folder} has no {REPORT_JSON} naming its data: give --dataset.")
        default, data = recorded.default, recorded.dataset
    metric = load_metric(task_metric(metric_name or recorded.metric, task))
    _check_metric(metric, model)
    model.to(resolve_device(device))
    if default:
        loaded = load_default_task(default)
        task_data = dataclasses.replace(loaded.data, calibration=None)
    else:
        task_data = load_task_data(data, task, calibration=False)
    if task_data.evaluation is None:
        raise ValueError("Nothing to evaluate: give an evaluation split (--eval-split).")
    length = evaluation_max_length(max_length or OptinConfig.max_length, model.config)
    if task == CAUSAL_LM:
        length = check_window(given_length or task_data.eval_window or max_length or OptinConfig.max_length, model.config)
    encoder = Encoder(task, task_data.columns, processor, length)
    return measure(
        {"pruned" if pruned else "dense": model},
        name=model_path,
        data=task_data,
        encoder=encoder,
        labels=label_encoder(task_data, model.config, processor),
        metric=metric,
    )
