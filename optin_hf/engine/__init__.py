"""How candidate structures are run: the reference loop (one full masked forward each) or the
fast engine (prefix-cached, batched variants), split across processes and checkpointed."""

from .run import RawLosses, compute_raw_losses

__all__ = ["RawLosses", "compute_raw_losses"]
