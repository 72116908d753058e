"""Layer-streamed scoring: a model larger than the device, one decoder layer resident at a time.

A model loaded by transformers with its decoder layers offloaded (`load_streamed`, or any
`from_pretrained(..., device_map=..., offload_folder=...)` that offloads them) keeps those
layers' weights on the meta device; accelerate's hooks bring a module's weights onto the
execution device for its forward and drop them after (from disk, memory-mapped, or from CPU
memory when the execution device is a GPU). Every forward that scoring runs is then already
streamed. What the hooks do not cover is work on a layer's pieces outside its forward: the fast
engine finishes a layer from its attention output, reads its down projection's weight to mask
neurons without rerunning the FFN, and neuron grouping reads that weight to order neurons.
There the engine holds the layer `resident`: all its weights materialised once, the hooks told
to leave them, and released when it leaves the layer. At most one decoder layer is therefore
materialised at any time, besides what was never offloaded (embeddings, final norm, LM head).

The weights are the stored values, moved, never changed, so a streamed run's scores equal the
in-memory run's (the same operations on the same tensors, in the same order).

Streaming scores; it does not slim: slimming and the refit rewrite weights in place, which an
offloaded model does not hold. Compute the masks streamed, then prune a model in memory (on a
machine with the RAM) with `prune_model(model, data, masks=masks)`.
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from accelerate.hooks import AlignDevicesHook
from accelerate.utils import named_module_tensors, set_module_tensor_to_device
from torch import nn

from ..arch import ArchAdapter, check_model

# Criteria that only run the model (masked forwards) or read nothing; the others read weights or gradients directly.
STREAMED_CRITERIA = ("optin", "random")


def _offloading(module: nn.Module) -> AlignDevicesHook | None:
    """The accelerate hook that loads `module`'s own weights for each forward and drops them after, if any."""
    hook = getattr(module, "_hf_hook", None)
    return hook if isinstance(hook, AlignDevicesHook) and hook.offload else None


def is_streamed(model: nn.Module) -> bool:
    """Whether some of `model`'s weights are offloaded by accelerate (loaded per forward)."""
    return any(_offloading(module) is not None for module in model.modules())


def _tensor_names(module: nn.Module, hook: AlignDevicesHook) -> list[str]:
    """The tensors the hook loads and drops, as accelerate's own hook names them."""
    tensors = named_module_tensors(
        module, include_buffers=hook.offload_buffers, recurse=hook.place_submodules, remove_non_persistent=True
    )
    return [name for name, _ in tensors]


@contextmanager
def resident(layer: nn.Module) -> Iterator[None]:
    """While open, every offloaded weight under `layer` is materialised on its execution device, and the
    hooks leave it there (calls of the layer's pieces, direct weight reads); on exit they are dropped
    again. A no-op for a layer held in memory, or already held by an outer `resident`."""
    held = [(module, hook) for module in layer.modules() if (hook := _offloading(module)) is not None]
    try:
        for module, hook in held:
            hook.offload = False  # its forward now only moves inputs to the execution device
            for name in _tensor_names(module, hook):
                set_module_tensor_to_device(module, name, hook.execution_device, value=hook.weights_map[name])
        yield
    finally:
        for module, hook in held:
            for name in _tensor_names(module, hook):
                set_module_tensor_to_device(module, name, "meta")
            hook.offload = True


def check_streaming(model: nn.Module, adapter: ArchAdapter, config, repair: bool) -> None:
    """Refuse, before any scoring, what a model with offloaded weights cannot run (module docstring)."""
    if not is_streamed(model):
        return
    first = next(model.parameters())
    if first.device.type == "meta":
        raise ValueError(
            f"The first weights of this {model.config.model_type} model ({next(n for n, _ in model.named_parameters())}) "
            "are offloaded; layer-streamed scoring runs on the device of the first weights. Keep the embeddings on the "
            "device: load with optin_hf.engine.streaming.load_streamed, which offloads only the decoder layers."
        )
    if not adapter.chained_layers:
        raise ValueError(
            f"Layer-streamed scoring needs layers that run one into the next, and {model.config.model_type} layers "
            "do not (the engine replays them inside the model's own forward): load this model in memory."
        )
    if repair:
        raise ValueError(
            "prune_model slims and refits the weights in place, and this model's decoder layers are offloaded "
            "(layer-streamed): compute the masks on it with pruner.compute_masks(model, data), then load the model "
            "in memory and call pruner.prune_model(model, data, masks=masks)."
        )
    if config.importance not in STREAMED_CRITERIA:
        raise ValueError(
            f"importance={config.importance!r} reads weights or gradients that this model keeps offloaded "
            f"(layer-streamed); streamed scoring runs {' or '.join(map(repr, STREAMED_CRITERIA))}, or load the model in memory."
        )
    # These read weights (fingerprints, token merging, refits, residual widths, a per-layer allocation's dense pass) or
    # slim between steps. allocation="auto" is "scores" here (`auto_settings.auto_allocation`).
    unsupported = (("checkpoint_dir", None), ("prune_tokens", False), ("prune_steps", 1), ("prune_channels", False),
                   ("selection", "scores"), ("allocation", "scores"))
    for setting, unset in unsupported:
        if getattr(config, setting, unset) != unset:
            raise ValueError(
                f"{setting}={getattr(config, setting)!r} is not supported with layer-streamed scoring (its weights "
                f"are offloaded): set {setting}={unset!r}, or load the model in memory."
            )


def streaming_device_map(model: nn.Module, adapter: ArchAdapter, device: str, offload: str) -> dict[str, str]:
    """A `from_pretrained` device map of `model` (may be on the meta device) that puts every decoder layer
    on `offload` ("disk" or "cpu") and everything else on `device`."""
    layers = adapter.layers_of(model)
    path = next(name for name, module in model.named_modules() if module is layers)
    device_map: dict[str, str] = {}
    parent = ""
    for part in path.split("."):  # the siblings of every module on the way down to the layers
        module = model.get_submodule(parent)
        for name, _ in module.named_children():
            if name != part:
                device_map[f"{parent}.{name}".lstrip(".")] = device
        parent = f"{parent}.{part}".lstrip(".")
    device_map.update({f"{path}.{i}": offload for i in range(len(layers))})
    return device_map


def load_streamed(
    name_or_path: str | os.PathLike,
    *,
    offload_folder: str | os.PathLike | None = None,
    device: str | torch.device = "cpu",
    model_class: Any = None,
    **kwargs: Any,
) -> nn.Module:
    """`model_class.from_pretrained(name_or_path, **kwargs)` (default `AutoModelForCausalLM`) with every decoder
    layer offloaded and the rest on `device`: to disk under `offload_folder`, or, with no folder and a GPU
    `device`, to CPU memory. Never holds the whole model in memory; scoring then streams one layer at a time."""
    from accelerate import init_empty_weights
    from transformers import AutoConfig, AutoModelForCausalLM

    device = torch.device(device)
    if device.type != "cpu" and device.index is None:  # a device map names one accelerator: the first
        device = torch.device(device.type, 0)
    device = str(device)
    if offload_folder is None and device == "cpu":
        raise ValueError(
            "load_streamed on device='cpu' reads the offloaded layers from disk: pass offload_folder=<a folder with "
            "room for the model's weights> (or a GPU device, to keep the layers in CPU memory)."
        )
    if offload_folder is not None and os.path.exists(offload_folder) and not os.path.isdir(offload_folder):
        raise OSError(f"offload_folder={os.fspath(offload_folder)!r} is a file; give a folder (it is created if missing).")
    model_class = model_class or AutoModelForCausalLM
    config = AutoConfig.from_pretrained(name_or_path, **{k: kwargs[k] for k in ("revision", "token") if k in kwargs})
    with init_empty_weights():
        empty = model_class.from_config(config)
    adapter = check_model(empty)
    offload = "cpu" if offload_folder is None else "disk"
    device_map = streaming_device_map(empty, adapter, device, offload)
    return model_class.from_pretrained(
        name_or_path, device_map=device_map, offload_folder=None if offload_folder is None else os.fspath(offload_folder),
        **kwargs,
    ).eval()
