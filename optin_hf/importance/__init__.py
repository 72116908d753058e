"""Interchangeable importance criteria, looked up by `OptinConfig.importance`."""

from .base import ImportanceCriterion
from .fisher import FisherImportance
from .magnitude import MagnitudeImportance
from .optin import OptinImportance
from .random import RandomImportance
from .scores import SCORES_NAME, ImportanceScores

CRITERIA: dict[str, type] = {c.name: c for c in (OptinImportance, MagnitudeImportance, RandomImportance, FisherImportance)}

__all__ = ["CRITERIA", "SCORES_NAME", "ImportanceCriterion", "ImportanceScores"]
