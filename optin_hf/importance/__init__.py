"""Interchangeable importance criteria, looked up by `OptinConfig.importance` (`optin_hf.criteria`)."""

from ..config import OptinConfig
from ..criteria import CRITERIA, register_criterion
from .base import ConfiguredImportance, ImportanceCriterion
from .fisher import FisherImportance
from .flap import FlapImportance
from .magnitude import MagnitudeImportance
from .optin import OptinImportance
from .random import RandomImportance
from .scores import SCORES_NAME, ImportanceScores
from .wanda import WandaSpImportance


def criterion_from_config(config: OptinConfig) -> ImportanceCriterion:
    """The criterion `config.importance` names, built from the config's settings. Built here, above the criteria:
    the registry only names them, and a configured criterion's base gives its settings
    (`ConfiguredImportance.settings_from`) rather than building the subclass it does not know."""
    criterion = CRITERIA[config.importance]
    if isinstance(criterion, type) and issubclass(criterion, ConfiguredImportance):
        return criterion(**criterion.settings_from(config))
    return criterion.from_config(config)


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
