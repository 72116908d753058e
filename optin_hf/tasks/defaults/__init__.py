"""Embedded default models trained offline from pip-packaged weights and data (see ``load_default``)."""
from .loader import DefaultTask, load_default
from .registry import DEFAULT_NAMES

__all__ = ["DEFAULT_NAMES", "DefaultTask", "load_default"]
