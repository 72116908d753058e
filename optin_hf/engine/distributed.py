"""Candidates split across processes (torchrun, accelerate launch) and their losses gathered.

Launched normally there is one process: it gets every candidate and gathers only its own.
"""

from __future__ import annotations

from typing import Any, Sequence, TypeVar

import torch
from accelerate import PartialState
from accelerate.utils import gather_object

T = TypeVar("T")


def process_state(device: torch.device) -> PartialState:
    """The process group, on gloo when the model is on CPU (nccl on GPUs under accelerate launch)."""
    return PartialState(cpu=device.type == "cpu")


def share(items: Sequence[T], state: PartialState) -> list[T]:
    """This process's share: every num_processes-th item.

    Dealt round-robin, not in contiguous blocks, because a candidate in an early layer costs
    more than one in a late layer (more layers to rerun): blocks would leave the process with
    the last layers idle while the one with the first layers works.
    """
    return list(items[state.process_index :: state.num_processes])


def gather(items: list[Any]) -> list[Any]:
    """Every process's items, on every process."""
    return gather_object(items)
