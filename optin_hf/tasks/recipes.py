"""YAML recipes: one pruning run written down, like the reference's `main.py --config`.

    default: bbc-news                 # an embedded default, or:
    model: <folder or Hub id>         # with task (optional), processor (optional) and
    dataset: {path: ..., config: ..., calibration_split: ..., eval_split: ..., ...}   # DataSpec
    metric: accuracy | mean_iou | perplexity | glue/<task>   # optional: the task's (mean_iou for segmentation,
                                                            # perplexity for text-generation)
    optin: {mac_constraint: 0.6, ...}  # OptinConfig; a criterion's own settings under importance_options: {KEY: VALUE}
    output: <folder>
    device: cuda | cpu | ...          # optional; default: the GPU if there is one
    push_to_hub: <repo id>            # optional, with push_full: true for the weights too

Unknown keys are errors (a typo must not silently fall back to a default).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Hashable
from pathlib import Path
from typing import Any

import yaml

from ..config import OptinConfig
from .task_data import DataSpec
from .workflow import PruneJob

# The shipped recipes: optin_hf/recipes links to the repository's top-level recipes/ (setup.cfg packages the files).
RECIPES_DIR = Path(__file__).parent.parent / "recipes"
# The recipe that prunes each embedded default (tasks.defaults.DEFAULT_NAMES): `prune --default NAME` takes its
# settings from that file, their one source.
DEFAULT_RECIPES = {
    "bbc-news": "minilm-bbc-news.yaml",
    "tweet-sentiment": "minilm-tweet-sentiment.yaml",
    "digits-vit": "vit-digits.yaml",
    "digits-resnet": "digits-resnet.yaml",
    "digit-scenes-segformer": "digit-scenes-segformer.yaml",
    "shakespeare-smollm2": "smollm2-shakespeare.yaml",
}

# The keys that go to PruneJob's fields of the same name as they are; `optin` and `dataset` are sections.
JOB_KEYS = ("default", "model", "task", "processor", "metric", "output", "device", "push_to_hub", "push_full")
RECIPE_KEYS = (*JOB_KEYS, "optin", "dataset")


class DuplicateKeyError(yaml.YAMLError):
    """A mapping that names one key twice: YAML forbids it, and PyYAML would keep the last silently."""

    def __init__(self, key: Any, first_line: int, line: int) -> None:
        super().__init__(f"key {key!r} is given twice, on lines {first_line} and {line}: keep one")


class UniqueKeyLoader(yaml.SafeLoader):
    """SafeLoader that refuses duplicate keys in any mapping, nested ones included."""

    def construct_mapping(self, node: yaml.MappingNode, deep: bool = False) -> dict[Any, Any]:
        first_lines: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            if not isinstance(key, Hashable):  # SafeLoader names that error itself
                continue
            line = key_node.start_mark.line + 1
            if key in first_lines:
                raise DuplicateKeyError(key, first_lines[key], line)
            first_lines[key] = line
        return super().construct_mapping(node, deep)


def _mapping(value: Any, where: str) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise ValueError(f"{where} must be a mapping of keys to values, not {type(value).__name__}.")
    return value


def _section(values: dict[str, Any], key: str, build: Callable[[dict[str, Any]], Any]) -> Any:
    """`build` of the mapping under `key` (None when absent or empty, as YAML reads `key:` alone); its
    errors name the section, e.g. "dataset: streaming='false' is a str; ..."."""
    if values.get(key) is None:
        return None
    section = _mapping(values[key], key)
    try:
        return build(section)
    except (TypeError, ValueError) as err:
        raise ValueError(f"{key}: {err}") from err


def parse_recipe(values: Any, where: str = "recipe") -> PruneJob:
    """A `PruneJob` from a recipe's parsed YAML; `where` names it in errors.

    Every key's value is type-checked where it lands (`PruneJob`, `DataSpec`, `OptinConfig`), with an
    error naming the key, the value and the expected type.
    """
    values = _mapping(values, where)
    unknown = sorted(set(values) - set(RECIPE_KEYS))
    if unknown:
        raise ValueError(f"{where}: unknown keys {unknown}; valid keys are {list(RECIPE_KEYS)}.")
    if values.get("default") is None and values.get("model") is None:
        raise ValueError(f"{where}: name a model (with a dataset) or an embedded default.")
    try:
        return PruneJob(
            optin=_section(values, "optin", OptinConfig.from_dict) or OptinConfig(),
            data=_section(values, "dataset", DataSpec.from_dict),
            **{key: values[key] for key in JOB_KEYS if key in values},
        )
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: {err}") from err


def load_recipe(path: str | os.PathLike) -> PruneJob:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"Recipe {path} does not exist.")
    try:
        values = yaml.load(path.read_text(), Loader=UniqueKeyLoader)
    except DuplicateKeyError as err:
        raise ValueError(f"{path}: {err}.") from err
    except yaml.YAMLError as err:
        raise ValueError(f"{path} is not valid YAML: {err}") from err
    return parse_recipe(values, str(path))


def default_recipe(name: str) -> PruneJob:
    """The shipped recipe that prunes embedded default `name`."""
    if name not in DEFAULT_RECIPES:
        raise ValueError(f"Unknown embedded default {name!r}; choose one of {list(DEFAULT_RECIPES)}.")
    return load_recipe(RECIPES_DIR / DEFAULT_RECIPES[name])
