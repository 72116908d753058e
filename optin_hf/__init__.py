"""optin-hf: retraining-free OPTIN pruning of transformers into physically slimmed models."""

from .config import OptinConfig
from .importance import ImportanceScores
from .macs import count_macs
from .masks import PruningMasks
from .modeling import AutoOptinModel
from .pruner import OptinPruner

__version__ = "0.1.0"

__all__ = ["AutoOptinModel", "ImportanceScores", "OptinConfig", "OptinPruner", "PruningMasks", "count_macs"]
