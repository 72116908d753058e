"""The registry of architecture adapters, keyed by `config.model_type`."""

from __future__ import annotations

from torch import nn

from .base import ArchAdapter, EmptyAttention, get_submodule, set_submodule
from .capabilities import FEATURES, REPAIRS, Capabilities, Feature
from .projection import Projection, Slice
from .bert import BERT
from .convnext import CONVNEXT
from .dinov2 import DINOV2
from .distilbert import DISTILBERT
from .gpt2 import GPT2
from .llama import LLAMA
from .resnet import RESNET
from .segformer import SEGFORMER
from .mask2former import MASK2FORMER
from .swin import SWIN
from .vit import DEIT, VIT

ADAPTERS: dict[str, ArchAdapter] = {}


def register_adapter(adapter: ArchAdapter, *, exist_ok: bool = False) -> None:
    """Make optin-hf prune every `config.model_type` in `adapter.model_types` through `adapter`.

    A type that already has an adapter is refused unless `exist_ok=True`, which replaces it.
    """
    if not isinstance(adapter, ArchAdapter):
        raise TypeError(f"register_adapter takes an ArchAdapter, not {type(adapter).__name__}.")
    if not adapter.model_types:
        raise ValueError("The adapter names no model_types; set ArchAdapter(model_types=(...)).")
    taken = sorted(t for t in adapter.model_types if t in ADAPTERS)
    if taken and not exist_ok:
        raise ValueError(
            f"model_type {', '.join(map(repr, taken))} already has an adapter; pass exist_ok=True to replace it."
        )
    ADAPTERS.update(dict.fromkeys(adapter.model_types, adapter))


for _adapter in (BERT, DISTILBERT, VIT, DEIT, SWIN, RESNET, CONVNEXT, SEGFORMER, MASK2FORMER, DINOV2, LLAMA, GPT2):
    register_adapter(_adapter)


def get_adapter(model_or_config) -> ArchAdapter:
    """The adapter for a model (or its config); a clear error names the supported types, or the
    config field of a variant the adapter cannot prune (`ArchAdapter.check_config`)."""
    config = getattr(model_or_config, "config", model_or_config)
    model_type = getattr(config, "model_type", None)
    if model_type not in ADAPTERS:
        raise ValueError(
            f"Unsupported model_type {model_type!r}: optin-hf supports {sorted(ADAPTERS)}. "
            "To add one, describe its layout in an ArchAdapter and call optin_hf.register_adapter(adapter)."
        )
    adapter = ADAPTERS[model_type]
    adapter.check_config(config)
    return adapter


def refusal(adapter: ArchAdapter, feature: Feature, model_type: str | None = None) -> str:
    """Why `adapter` (of `model_type`, by default its first) does not run `feature`: the one wording of every
    refusal, naming the model types whose adapters declare it where the fix is another model."""
    supporters = [name for name, other in ADAPTERS.items() if other.supports(feature)]
    return adapter.capabilities.refusal(feature, model_type or adapter.model_types[0], supporters)


def require(adapter: ArchAdapter, feature: Feature, model_type: str | None = None) -> None:
    """Refuse, up front, a `feature` the adapter does not declare (`ArchAdapter.capabilities`)."""
    if not adapter.supports(feature):
        raise ValueError(refusal(adapter, feature, model_type))


def check_model(model: nn.Module) -> ArchAdapter:
    """Adapter for a model instance, checking it has the expected modules."""
    adapter = get_adapter(model)
    layer = adapter.layers_of(model)[0]
    paths = [adapter.ffn_up, adapter.ffn_down, adapter.feature]
    if adapter.supports("heads"):
        paths.append(adapter.attn_core)
        if not isinstance(get_submodule(layer, adapter.attn_core), EmptyAttention):
            paths += [adapter.query, adapter.attn_out]
    for path in paths:
        try:
            get_submodule(layer, path)
        except AttributeError as err:
            raise ValueError(
                f"{type(model).__name__} has no module {path!r} where the {adapter.model_types[0]} adapter "
                "expects it; this transformers version may lay the model out differently."
            ) from err
    return adapter


__all__ = [
    "ADAPTERS",
    "FEATURES",
    "REPAIRS",
    "ArchAdapter",
    "Capabilities",
    "EmptyAttention",
    "Feature",
    "Projection",
    "Slice",
    "check_model",
    "get_adapter",
    "get_submodule",
    "refusal",
    "register_adapter",
    "require",
    "set_submodule",
]
