"""Deploying a slim model outside PyTorch: ONNX export checked in ONNX Runtime (`export_onnx`), and ORT latency
beside PyTorch's (`compare_latency`). Needs the `onnx` extra: pip install "optin-hf[onnx]".

Resolved on first use, so that the CLI's parser reads `settings` without loading onnx and onnxruntime.
"""

from __future__ import annotations

from importlib import import_module
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ONNX_CONFIG_NAME": ".deploy",
    "ONNX_MODEL_NAME": ".to_onnx",
    "export_onnx": ".deploy",
    "compare_latency": ".latency",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:
    from .deploy import ONNX_CONFIG_NAME, export_onnx
    from .latency import compare_latency
    from .to_onnx import ONNX_MODEL_NAME


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
