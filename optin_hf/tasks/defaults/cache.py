"""Where trained defaults live, and how they get there without ever looking valid half-written."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from dataclasses import asdict
from importlib.metadata import version
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from huggingface_hub import constants

if TYPE_CHECKING:
    from .registry import Recipe

CACHE_ENV = "OPTIN_HF_DEFAULTS_CACHE"
KEY_PACKAGES = ("torch", "transformers")
NOT_IN_KEY = ("description",)


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir``, else ``$OPTIN_HF_DEFAULTS_CACHE``, else ``$HF_HOME/optin_hf/tasks/defaults``."""
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

    The prose description is left out: rewording it must not trigger a retrain.
    """
    data = {field: value for field, value in asdict(recipe).items() if field not in NOT_IN_KEY}
    payload = json.dumps({"recipe": data, "versions": versions}, sort_keys=True, default=str)
    return hashlib.sha256(payload.encode()).hexdigest()[:12]


@contextmanager
def atomic_directory(final: Path) -> Iterator[Path]:
    """Yield a hidden temp dir beside ``final`` and rename it into place only if the block succeeds.

    A killed or failing run leaves at most a dot-named ``*.partial`` folder, never ``final``: the rename is
    atomic on one file system. 0o755 undoes mkdtemp's private mode so a shared cache stays readable.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", suffix=".partial", dir=final.parent))
    try:
        yield tmp
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    tmp.chmod(0o755)
    try:
        os.replace(tmp, final)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not final.is_dir():
            raise
