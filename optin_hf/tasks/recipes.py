"""YAML recipes: one pruning run written down, like the reference's `main.py --config`.

    default: bbc-news                 # an embedded default, or:
    model: <folder or Hub id>         # with task (optional), processor (optional) and
    dataset: {path: ..., config: ..., calibration_split: ..., eval_split: ..., ...}   # DataSpec
    metric: accuracy | mean_iou | glue/<task>   # optional: the task's (mean_iou for segmentation)
    optin: {mac_constraint: 0.6, ...}  # OptinConfig
    output: <folder>
    device: cuda | cpu | ...          # optional; default: the GPU if there is one
    push_to_hub: <repo id>            # optional, with push_full: true for the weights too

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import yaml

from ..config import OptinConfig
from .task_data import DataSpec
from .workflow import PruneJob

RECIPE_KEYS = (
    "default", "model", "task", "processor", "dataset", "metric", "optin", "output", "device", "push_to_hub", "push_full"
)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, not {type(value).__name__}.")
    return value


def parse_recipe(values: Any, where: str = "recipe") -> PruneJob:
    """A `PruneJob` from a recipe's parsed YAML; `where` names it in errors."""
    values = _mapping(values, where)
    unknown = sorted(set(values) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {list(RECIPE_KEYS)}.")
    if not values.get("default") and not values.get("model"):
        raise ValueError(f"{where}: name a model (with a dataset) or an embedded default.")
    try:
        dataset = values.get("dataset")
        return PruneJob(
            optin=OptinConfig.from_dict(_mapping(values.get("optin") or {}, "optin")),
            output=Path(values["output"]) if values.get("output") else None,
            default=values.get("default"),
            model=values.get("model"),
            task=values.get("task"),
            data=DataSpec.from_dict(_mapping(dataset, "dataset")) if dataset is not None else None,
            processor=values.get("processor"),
            metric=values.get("metric"),
            push_to_hub=values.get("push_to_hub"),
            push_full=bool(values.get("push_full", False)),
            device=values.get("device"),
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def load_recipe(path: str | os.PathLike) -> PruneJob:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist.")
    try:
        values = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    return parse_recipe(values, str(path))
