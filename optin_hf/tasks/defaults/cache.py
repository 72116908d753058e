"""Where trained defaults live: a folder per recipe and package versions (written atomically by the loader)."""
from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING

from huggingface_hub import constants

if TYPE_CHECKING:
    from .registry import Recipe

CACHE_ENV = "OPTIN_HF_DEFAULTS_CACHE"
KEY_PACKAGES = ("torch", "transformers")
NOT_IN_KEY = ("description", "evaluation")  # neither changes the model built


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$OPTIN_HF_DEFAULTS_CACHE``, else ``$HF_HOME/optin_hf/defaults``."""
    if cache_dir is not None:
        return Path(cache_dir)
    if os.environ.get(CACHE_ENV):
        return Path(os.environ[CACHE_ENV])
    return Path(constants.HF_HOME) / "optin_hf" / "defaults"


def package_versions(packages: tuple[str, ...]) -> dict[str, str]:
    """Versions that change the trained result: the frameworks plus the recipe's data/weight packages."""
    return {name: version(name) for name in (*KEY_PACKAGES, *packages)}


def cache_key(recipe: Recipe, versions: dict[str, str]) -> str:
    """Short hash of the recipe and the versions, so any change trains a fresh model beside the old one.

    The prose description and the evaluation protocol are left out: changing them must not trigger a retrain.
    """
    data = {field: value for field, value in asdict(recipe).items() if field not in NOT_IN_KEY}
    payload = json.dumps({"recipe": data, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]
