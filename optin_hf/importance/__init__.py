"""Interchangeable importance criteria, looked up by `OptinConfig.importance` (`optin_hf.criteria`)."""

from ..criteria import CRITERIA, criterion_from_config, register_criterion
from .base import ConfiguredImportance, ImportanceCriterion
from .fisher import FisherImportance
from .flap import FlapImportance
from .magnitude import MagnitudeImportance
from .optin import OptinImportance
from .random import RandomImportance
from .scores import SCORES_NAME, ImportanceScores
from .wanda import WandaSpImportance

__all__ = [
    "CRITERIA",
    "SCORES_NAME",
    "ConfiguredImportance",
    "FisherImportance",
    "FlapImportance",
    "ImportanceCriterion",
    "ImportanceScores",
    "MagnitudeImportance",
    "OptinImportance",
    "RandomImportance",
    "WandaSpImportance",
    "criterion_from_config",
    "register_criterion",
]
