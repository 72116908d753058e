"""`PruningMasks`: which heads and neurons a pruned model keeps (and, for vision models in
token mode, how many tokens each layer holds), stored as safetensors."""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from .arch import ArchAdapter, get_adapter

MASKS_NAME = "optin_masks.safetensors"


def load_safetensors(path: str | os.PathLike, what: str) -> dict[str, torch.Tensor]:
    """Read a safetensors file with an error that says which artefact was broken."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{what} file {path} does not exist.")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{path} is not a valid safetensors {what} file ({err}). Re-create or re-download it.") from err


def check_masks(masks: object, where: str) -> None:
    """Refuse anything but a PruningMasks (a dict of tensors would fail deep inside with AttributeError)."""
    if not isinstance(masks, PruningMasks):
        raise TypeError(
            f"{where}: masks must be a PruningMasks, not a {type(masks).__name__}. Build one with "
            "PruningMasks(head_mask, neuron_mask) or read one with PruningMasks.load(path)."
        )


def units_present(counts: torch.Tensor | None, num_layers: int, width: int) -> torch.Tensor:
    """bool [num_layers, width]: which units exist when layer l has `counts[l]` (None: every layer `width`)."""
    if counts is None:
        return torch.ones(num_layers, width, dtype=torch.bool)
    return torch.arange(width)[None, :] < counts[:, None]


def _bool_mask(name: str, mask: object) -> torch.Tensor:
    """`mask` as bool on the CPU. Only 0/1 values (any dtype) are masks: a cast would read 0.5, 2 or NaN (a corrupt
    or foreign file) as "kept", silently."""
    mask = torch.as_tensor(mask).cpu()
    if mask.dtype != torch.bool and ((bad := (mask != 0) & (mask != 1)).any()):
        raise ValueError(f"{name} holds {mask[bad][0].item()} ({mask.dtype}); a mask holds only 0 (pruned) and 1 (kept).")
    return mask.to(torch.bool)


@dataclass
class PruningMasks:
    """Kept structures of a dense model.

    head_mask: bool [num_layers, num_heads]; neuron_mask: bool [num_layers, intermediate_size];
    token_schedule: int64 [num_layers], tokens each layer holds (prefix tokens included), or
    None when no tokens are merged. head_counts / neuron_counts: int64 [num_layers], the heads
    and neurons each layer has when layers differ (Swin's stages); the masks are as wide as the
    widest layer, and a layer's units from its count on are padding, never kept. None: every
    layer has the masks' full width. channel_mask: bool [channels of every group, group after group], the
    residual channels kept where they are pruned too (`OptinConfig.prune_channels`; the groups' widths are
    `ArchAdapter.channel_widths`), or None: every residual channel kept.
    """

    head_mask: torch.Tensor
    neuron_mask: torch.Tensor
    token_schedule: torch.Tensor | None = None
    head_counts: torch.Tensor | None = None
    neuron_counts: torch.Tensor | None = None
    channel_mask: torch.Tensor | None = None

    def __post_init__(self) -> None:
        self.head_mask = _bool_mask("head_mask", self.head_mask)
        self.neuron_mask = _bool_mask("neuron_mask", self.neuron_mask)
        if self.head_mask.dim() != 2 or self.neuron_mask.dim() != 2:
            raise ValueError("head_mask and neuron_mask must be 2-D: [num_layers, num_heads] and [num_layers, intermediate_size].")
        if self.head_mask.shape[0] != self.neuron_mask.shape[0]:
            raise ValueError(
                f"head_mask has {self.head_mask.shape[0]} layers but neuron_mask has {self.neuron_mask.shape[0]}."
            )
        for kind, mask in (("head", self.head_mask), ("neuron", self.neuron_mask)):
            counts = getattr(self, f"{kind}_counts")
            if counts is None:
                continue
            counts = torch.as_tensor(counts).to(torch.int64).cpu()
            if counts.shape != (self.num_layers,) or (counts < 0).any() or (counts > mask.shape[1]).any():
                raise ValueError(
                    f"{kind}_counts {counts.tolist()} must hold one count per layer ({self.num_layers}), each at most "
                    f"the {kind}_mask width {mask.shape[1]}."
                )
            padding = mask & ~units_present(counts, self.num_layers, mask.shape[1])
            if padding.any():
                layer, unit = padding.nonzero()[0].tolist()
                raise ValueError(
                    f"{kind}_mask keeps {kind} {unit} of layer {layer}, which has only {int(counts[layer])} {kind}s: "
                    "a unit past a layer's count is padding and cannot be kept."
                )
            setattr(self, f"{kind}_counts", counts)
        if self.channel_mask is not None:
            self.channel_mask = _bool_mask("channel_mask", self.channel_mask)
            if self.channel_mask.dim() != 1:
                raise ValueError(f"channel_mask must be 1-D (every group's channels in turn); got {tuple(self.channel_mask.shape)}.")
        if self.token_schedule is not None:
            self.token_schedule = torch.as_tensor(self.token_schedule).to(torch.int64).cpu()
            if self.token_schedule.shape != (self.num_layers,):
                raise ValueError(f"token_schedule must be 1-D with one count per layer ({self.num_layers}); got {tuple(self.token_schedule.shape)}.")
            if (self.token_schedule[1:] > self.token_schedule[:-1]).any():
                raise ValueError(f"token_schedule {self.token_schedule.tolist()} increases: a layer cannot hold more tokens than the one before.")

    @property
    def num_layers(self) -> int:
        return self.head_mask.shape[0]

    def heads_per_layer(self) -> list[int]:
        return self.head_mask.sum(1).tolist()

    def neurons_per_layer(self) -> list[int]:
        return self.neuron_mask.sum(1).tolist()

    def channel_keeps(self, widths: tuple[int, ...]) -> list[torch.Tensor]:
        """The kept residual channels of each group of `widths` (`ArchAdapter.channel_widths`), as indices."""
        if self.channel_mask is None:
            return [torch.arange(width) for width in widths]
        return [part.nonzero().flatten() for part in self.channel_mask.split(list(widths))]

    def channels_per_group(self, widths: tuple[int, ...]) -> tuple[int, ...]:
        return tuple(len(keep) for keep in self.channel_keeps(widths))

    def present(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Which heads and neurons the dense model has (bool, the masks' shapes): all but the padding."""
        return (
            units_present(self.head_counts, self.num_layers, self.head_mask.shape[1]),
            units_present(self.neuron_counts, self.num_layers, self.neuron_mask.shape[1]),
        )

    def with_masks(self, head_mask: torch.Tensor, neuron_mask: torch.Tensor, token_schedule: torch.Tensor | None = None) -> "PruningMasks":
        """Other kept units of the same dense model (its layer counts carried over)."""
        return replace(self, head_mask=head_mask, neuron_mask=neuron_mask, token_schedule=token_schedule)

    @classmethod
    def full(cls, config, adapter: ArchAdapter | None = None) -> "PruningMasks":
        """Masks that keep everything of a dense model with this config (with layer counts where layers differ);
        `adapter` is the config's adapter where the caller has it."""
        geometry = (adapter or get_adapter(config)).layer_geometry(config)
        layers = len(geometry)
        counts = {}
        for kind, per_layer in (("head", [g.heads for g in geometry]), ("neuron", [g.neurons for g in geometry])):
            counts[kind] = torch.tensor(per_layer) if len(set(per_layer)) > 1 else None
        heads, neurons = max(g.heads for g in geometry), max(g.neurons for g in geometry)
        return cls(
            units_present(counts["head"], layers, heads),
            units_present(counts["neuron"], layers, neurons),
            head_counts=counts["head"],
            neuron_counts=counts["neuron"],
        )

    def check_fits(self, config, adapter: ArchAdapter | None = None) -> None:
        """Raise if these masks were not made for a dense model with this config (of `adapter`, where known)."""
        adapter = adapter or get_adapter(config)
        expected = PruningMasks.full(config, adapter)
        if self.head_mask.shape != expected.head_mask.shape or self.neuron_mask.shape != expected.neuron_mask.shape:
            raise ValueError(
                f"Masks do not fit this model: head_mask {tuple(self.head_mask.shape)} and neuron_mask "
                f"{tuple(self.neuron_mask.shape)}, but the model needs {tuple(expected.head_mask.shape)} and "
                f"{tuple(expected.neuron_mask.shape)}. Were they computed for another base model?"
            )
        for kind, mine, needed in zip(("head", "neuron"), self.present(), expected.present()):
            if not torch.equal(mine, needed):
                raise ValueError(
                    f"Masks do not fit this model: its layers have {needed.sum(1).tolist()} {kind}s, the masks were "
                    f"made for {mine.sum(1).tolist()}. Were they computed for another base model?"
                )
        if self.channel_mask is not None:
            if not adapter.supports("channels"):
                raise ValueError(f"These masks prune residual channels, which a {config.model_type} model has none of.")
            widths = adapter.channel_widths(config)
            if len(self.channel_mask) != sum(widths):
                raise ValueError(
                    f"Masks do not fit this model: channel_mask has {len(self.channel_mask)} channels, the model's "
                    f"residual groups have {list(widths)}. Were they computed for another base model?"
                )
            if 0 in self.channels_per_group(widths):
                raise ValueError(f"channel_mask keeps {list(self.channels_per_group(widths))} channels of the groups "
                                 f"{list(widths)}: every group keeps at least one.")
        if self.token_schedule is not None:
            tokens, prefix = adapter.default_seq_len(config), adapter.num_prefix_tokens
            if tokens is None:
                raise ValueError(f"A token schedule needs a vision model (vit, deit), not {config.model_type!r}.")
            if int(self.token_schedule[0]) != tokens or int(self.token_schedule[-1]) <= prefix:
                raise ValueError(
                    f"token_schedule {self.token_schedule.tolist()} does not fit this model: layer 0 must hold all "
                    f"{tokens} tokens and every layer more than its {prefix} prefix token(s)."
                )

    def tokens_per_layer(self) -> list[int] | None:
        return self.token_schedule.tolist() if self.token_schedule is not None else None

    def save(self, path: str | os.PathLike) -> None:
        tensors = {"head_mask": self.head_mask.to(torch.uint8), "neuron_mask": self.neuron_mask.to(torch.uint8)}
        for name in ("token_schedule", "head_counts", "neuron_counts"):
            if getattr(self, name) is not None:
                tensors[name] = getattr(self, name)
        if self.channel_mask is not None:
            tensors["channel_mask"] = self.channel_mask.to(torch.uint8)
        save_file(tensors, str(path), metadata={"format": "optin-masks-v1"})

    @classmethod
    def load(cls, path: str | os.PathLike) -> "PruningMasks":
        tensors = load_safetensors(path, "pruning masks")
        missing = {"head_mask", "neuron_mask"} - set(tensors)
        if missing:
            raise ValueError(f"{path} lacks {sorted(missing)}: it is not an optin-hf masks file.")
        return cls(
            tensors["head_mask"],
            tensors["neuron_mask"],
            tensors.get("token_schedule"),
            tensors.get("head_counts"),
            tensors.get("neuron_counts"),
            tensors.get("channel_mask"),
        )
