"""ONNX export of an optin-hf model (slim or dense), validated in ONNX Runtime against PyTorch.

Why optin-hf exports its own models: optimum's exporter rebuilds a model from its config.json, which gives the dense
shapes (or fails: a slim checkpoint is deliberately not loadable by plain transformers), and the optimum-onnx
package cannot be installed beside transformers 5. Here the slim model itself, as `AutoOptinModel.from_pretrained`
rebuilds it (no repository code, nothing unpickled), is traced by `torch.onnx.export` (TorchScript, `dynamo=False`).

Why attention stays unfused. ORT's transformer optimizer (`onnxruntime.transformers.optimizer`) fuses attention
with one head count for every layer, taken from the config; a slim model's layers keep different counts, so its
fused graph computes wrong outputs or fails to load. The graph is written as torch exports it: every layer's
attention is its own MatMul/Softmax subgraph whose reshapes carry that layer's head count. ONNX Runtime's own
session optimisations fuse no attention in these graphs (tests/test_onnx.py checks it) and leave their outputs
right: the validation runs at ORT's default level, ORT_ENABLE_ALL, the one a deployment gets.

The trace uses a padded batch: transformers drops the attention mask of a batch without padding, and a trace
records only the path it took, so an unpadded trace would ignore every later mask. Every family traces (Mask2Former
and token merging included); what the trace freezes (a ViT's, Swin's or DINOv2's image size, a token schedule's
counts) is recorded in the config, and the validation runs the graph on shapes it was not traced on.
"""

from __future__ import annotations

import inspect
import platform
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

try:
    import onnx
    import onnxruntime as ort
    from onnxruntime.capi import onnxruntime_pybind11_state as ort_state
except ImportError as err:  # run_command turns it into one line naming the fix
    raise ImportError(f"ONNX export needs onnx and onnxruntime ({err.name} is not installed): pip install 'optin-hf[onnx]'.") from err

from ..arch import ArchAdapter, check_model
from ..macs import CostModel, recorded_image_size
from ..tokens import installed_schedule
from .settings import ATOL, DEFAULT_OPSET, OPSETS, RTOL

ONNX_MODEL_NAME = "model.onnx"
# What ONNX Runtime raises when it cannot load or run a graph (plain Exceptions, not RuntimeErrors).
ORT_ERRORS = (ort_state.Fail, ort_state.InvalidArgument, ort_state.InvalidGraph, ort_state.NotImplemented,
              ort_state.RuntimeException)
TEXT_LENGTH = 128  # the MAC count's tokens for a text model whose pruning run recorded none
# Families whose graph runs at any image size (convolutions, pooling and interpolation that read the input's
# shape). The others trace their config's image size into the graph (a ViT's position embeddings, a Swin's window
# padding) and are exported at that size.
ANY_IMAGE_SIZE = ("resnet", "convnext", "segformer")
SENTENCES = (  # text the validation tokenizes when the model comes with its tokenizer
    "Shares rose sharply after the company reported record quarterly profits.",
    "The match ended in a draw.",
    "Ministers will meet on Tuesday to discuss the new budget proposals, which critics say do too little for "
    "schools and hospitals across the north of the country.",
)


def _fail(message: str) -> None:
    raise ValueError(" ".join(message.split()))


def check_exportable(model: nn.Module, opset: int = DEFAULT_OPSET) -> ArchAdapter:
    """The model's adapter, or one ValueError naming what cannot be exported and what to do instead."""
    if isinstance(opset, bool) or not isinstance(opset, int) or opset not in OPSETS:
        _fail(f"opset={opset!r}: the TorchScript exporter writes ONNX opsets {OPSETS.start} to {OPSETS.stop - 1} "
              f"(default {DEFAULT_OPSET}).")
    adapter = check_model(model)
    if any(p.is_meta for p in model.parameters()):
        _fail("The model's weights are on the meta device (built without weights): load them before exporting.")
    dtypes = {p.dtype for p in model.parameters() if p.is_floating_point()}
    if dtypes != {torch.float32}:
        _fail(f"The model's weights are {sorted(map(str, dtypes))}: export a float32 model (ONNX Runtime's CPU "
              "kernels are float32), e.g. AutoOptinModel.from_pretrained(..., torch_dtype='float32').")
    return adapter


@dataclass(frozen=True)
class GraphInputs:
    """What the graph takes: the input names and, for images, the size it was traced at and whether it may vary."""

    names: tuple[str, ...]
    image_size: tuple[int, int] | None = None
    any_image_size: bool = False

    @classmethod
    def of(cls, model: nn.Module, adapter: ArchAdapter, image_size: Sequence[int] | None = None) -> GraphInputs:
        """A vision model is traced at `image_size`, else at the size it was pruned and counted at, else at its
        config's."""
        config = model.config
        if adapter.is_vision:
            size = adapter.image_size(config, image_size or recorded_image_size(model))
            return cls(("pixel_values",), tuple(size), config.model_type in ANY_IMAGE_SIZE)
        names = ["input_ids", "attention_mask"]
        # Segment ids only where the model learned several (BERT's tokenizer gives them; RoBERTa's one is constant).
        if getattr(config, "type_vocab_size", 1) > 1:
            names.append("token_type_ids")
        return cls(tuple(names))

    def axes(self) -> dict[str, dict[int, str]]:
        if self.image_size is None:
            return {name: {0: "batch", 1: "sequence"} for name in self.names}
        return {"pixel_values": {0: "batch", 2: "height", 3: "width"} if self.any_image_size else {0: "batch"}}

    def synthetic(self, model: nn.Module, batch: int, length: int | None = None, padded: bool = True,
                  seed: int = 0, image_size: tuple[int, int] | None = None) -> dict[str, torch.Tensor]:
        """Random inputs: `batch` texts of `length` tokens (the first ends in padding when `padded`), or images."""
        config, g = model.config, torch.Generator().manual_seed(seed)
        if self.image_size is not None:
            channels = getattr(config, "num_channels", None) or config.backbone_config.num_channels
            return {"pixel_values": torch.randn(batch, channels, *(image_size or self.image_size), generator=g)}
        length = length or 16
        vocab = config.vocab_size
        ids = torch.randint(min(5, vocab - 1), vocab, (batch, length), generator=g)
        mask = torch.ones_like(ids)
        if padded:
            mask[0, length * 2 // 3:] = 0
            ids[0, length * 2 // 3:] = getattr(config, "pad_token_id", None) or 0
        inputs = {"input_ids": ids, "attention_mask": mask}
        if "token_type_ids" in self.names:
            inputs["token_type_ids"] = torch.randint(0, config.type_vocab_size, (batch, length), generator=g)
        return inputs

    def describe(self, model: nn.Module) -> list[dict[str, Any]]:
        described = []
        for name in self.names:
            axes = self.axes()[name]
            example = self.synthetic(model, 1)[name]
            shape = [axes.get(i, size) for i, size in enumerate(example.shape)]
            described.append({"name": name, "dtype": str(example.dtype).removeprefix("torch."), "shape": shape})
        return described


def forward_options(model: nn.Module) -> dict[str, Any]:
    """What every forward of the export passes besides the inputs: no KV cache for a decoder (the graph maps
    tokens to logits; a cache is state the graph has no input for)."""
    return {"use_cache": False} if "use_cache" in inspect.signature(model.forward).parameters else {}


class _Graph(nn.Module):
    """The model as a function of positional tensors returning a tuple, which is what the tracer takes."""

    def __init__(self, model: nn.Module, inputs: Sequence[str], outputs: Sequence[str]):
        super().__init__()
        self.model, self.inputs, self.outputs = model, tuple(inputs), tuple(outputs)
        self.options = forward_options(model)

    def forward(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        out = self.model(**dict(zip(self.inputs, tensors)), **self.options)
        return tuple(out[name] for name in self.outputs)


@torch.no_grad()
def _outputs(model: nn.Module, inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    """The model's tensor outputs by name (a ModelOutput skips what it did not compute)."""
    device = next(model.parameters()).device
    out = model(**{k: v.to(device) for k, v in inputs.items()}, **forward_options(model))
    return {name: value.cpu().numpy() for name, value in out.items() if isinstance(value, torch.Tensor)}


def _output_axes(traced: Mapping[str, np.ndarray], other: Mapping[str, np.ndarray],
                 inputs: Mapping[tuple[int, int], str]) -> dict[str, dict[int, str]]:
    """Which dimensions of each output follow the input: those that differ between two inputs of other shapes,
    named after the input axis they equal ({(traced size, other size): name}), else after the output."""
    axes = {}
    for name, value in traced.items():
        dims = {}
        for i, (a, b) in enumerate(zip(value.shape, other[name].shape)):
            if a != b:
                dims[i] = inputs.get((a, b), f"{name}_{i}")
        axes[name] = dims
    return axes


def session(path: str | Path, threads: int | None = None) -> ort.InferenceSession:
    """A CPU session at ORT's default optimisation level (ORT_ENABLE_ALL), on `threads` intra-op threads
    (default: torch's thread count, so tests that pin torch to one thread pin ORT too)."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = threads or torch.get_num_threads()
    options.inter_op_num_threads = 1
    options.log_severity_level = 3  # errors only: ORT warns of unused initializers a slim graph may keep
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def _feeds(inputs: Mapping[str, torch.Tensor]) -> dict[str, np.ndarray]:
    return {name: value.cpu().numpy() for name, value in inputs.items()}


def _shape_text(inputs: Mapping[str, torch.Tensor]) -> str:
    first = next(iter(inputs.values()))
    return " x ".join(str(n) for n in first.shape)


def validate(model: nn.Module, graph: ort.InferenceSession, batches: Sequence[tuple[str, Mapping[str, torch.Tensor]]],
             atol: float = ATOL, rtol: float = RTOL) -> list[dict[str, Any]]:
    """Run each named batch through PyTorch and ORT; the largest differences per output, or a ValueError when one
    exceeds |ort - torch| <= atol + rtol * |torch|."""
    runs = []
    for what, inputs in batches:
        want = _outputs(model, inputs)
        names = [o.name for o in graph.get_outputs()]
        try:
            got = dict(zip(names, graph.run(names, _feeds(inputs))))
        except ORT_ERRORS as err:
            _fail(f"ONNX Runtime could not run the exported {model.config.model_type} graph on {what} "
                  f"({_shape_text(inputs)}): {err} Nothing was written.")
        errors = {}
        for name in names:
            if got[name].shape != want[name].shape:
                _fail(f"ONNX Runtime's {name!r} is {list(got[name].shape)} and PyTorch's {list(want[name].shape)} on "
                      f"{what} ({_shape_text(inputs)}): the traced graph froze a shape. Nothing was written.")
            diff = np.abs(got[name] - want[name])
            errors[name] = float(diff.max()) if diff.size else 0.0
            excess = diff - (atol + rtol * np.abs(want[name]))
            if diff.size and (excess.max() > 0 or not np.isfinite(got[name]).all()):
                _fail(f"ONNX Runtime's {name!r} differs from PyTorch's by up to {errors[name]:.3g} on {what} "
                      f"({_shape_text(inputs)}), over the tolerance |ort - torch| <= {atol:g} + {rtol:g} * |torch|. "
                      "Nothing was written. A larger tolerance (atol=..., rtol=...) accepts it, if that error is "
                      "acceptable.")
        runs.append({"inputs": what, "shape": list(next(iter(inputs.values())).shape), "max_abs_error": errors})
    return runs


def validation_batches(model: nn.Module, spec: GraphInputs, processor: Any = None) -> list[tuple[str, dict[str, torch.Tensor]]]:
    """Inputs unlike the traced ones: another batch size (3 and 1), for text another length and padding (real
    sentences through the model's tokenizer when it has one), for an image family of any size another size."""
    if spec.image_size is None:
        if processor is not None and processor.pad_token is not None:  # a decoder's tokenizer may have no padding
            limit = min(64, model.config.max_position_embeddings // 2)
            encoded = processor(list(SENTENCES), padding=True, truncation=True, max_length=limit, return_tensors="pt")
            inputs = {name: encoded[name] if name in encoded else torch.zeros_like(encoded["input_ids"]) for name in spec.names}
            first = ("3 sentences through the model's tokenizer", inputs)
        else:
            first = ("3 random texts, one padded", spec.synthetic(model, 3, 11, seed=1))
        return [first, ("1 random text", spec.synthetic(model, 1, 7, padded=False, seed=2))]
    height, width = spec.image_size
    other = (height + 32, width + 32) if spec.any_image_size else None
    what = f"3 random images{' of another size' if other else ''}"
    return [(what, spec.synthetic(model, 3, seed=1, image_size=other)), ("1 random image", spec.synthetic(model, 1, seed=2))]


def trace(model: nn.Module, path: Path, spec: GraphInputs, opset: int,
          batches: Sequence[tuple[str, Mapping[str, torch.Tensor]]]) -> list[dict[str, Any]]:
    """Write the ONNX graph of `model` to `path`, traced on a padded batch of 2 at 16 tokens (or the image size);
    returns the outputs' names, dtypes and shapes with their dynamic axes."""
    traced_inputs = spec.synthetic(model, 2, 16)
    traced_out = _outputs(model, traced_inputs)
    first, other = next(iter(traced_inputs.values())).shape, next(iter(batches[0][1].values())).shape
    named = {(first[axis], other[axis]): name for name_axes in spec.axes().values() for axis, name in name_axes.items()}
    out_axes = _output_axes(traced_out, _outputs(model, batches[0][1]), named)
    names = list(traced_out)
    device = next(model.parameters()).device
    graph = _Graph(model, spec.names, names).eval()
    args = tuple(traced_inputs[name].to(device) for name in spec.names)
    with warnings.catch_warnings():  # tracer and exporter notes on shapes: the validation checks what they warn of
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(graph, args, str(path), input_names=list(spec.names), output_names=names,
                              dynamic_axes={**spec.axes(), **out_axes}, opset_version=opset, dynamo=False,
                              do_constant_folding=True)
        except torch.onnx.errors.OnnxExporterError as err:  # an operator this opset lacks (e.g. scatter-add < 16)
            _fail(f"torch could not export this {model.config.model_type} model at opset {opset}: {err} Try the "
                  f"default opset {DEFAULT_OPSET}.")
    onnx.checker.check_model(str(path))
    return [{"name": name, "dtype": str(traced_out[name].dtype),
             "shape": [out_axes[name].get(i, n) for i, n in enumerate(traced_out[name].shape)]} for name in names]


def layer_counts(model: nn.Module, adapter: ArchAdapter) -> dict[str, list[int]]:
    """Heads and FFN neurons each layer runs, and what the dense model has."""
    layers, geometry = adapter.layers_of(model), adapter.layer_geometry(model.config)
    return {
        "heads_per_layer": [adapter.kept_heads(layer, model.config) for layer in layers],
        "neurons_per_layer": [adapter.kept_neurons(layer) for layer in layers],
        "dense_heads_per_layer": [g.heads for g in geometry],
        "dense_neurons_per_layer": [g.neurons for g in geometry],
    }


def mac_length(model: nn.Module, adapter: ArchAdapter) -> float | None:
    """The tokens a text model's MACs are counted at: its pruning run's, else TEXT_LENGTH or half the model's
    positions, whichever is fewer (RoBERTa's first positions are reserved); None for images, counted at their size."""
    if adapter.is_vision:
        return None
    result = getattr(model, "optin_result", None)
    recorded = result.seq_len if result is not None else None
    return recorded or min(TEXT_LENGTH, model.config.max_position_embeddings // 2)


def describe_model(model: nn.Module, adapter: ArchAdapter, image_size: Sequence[int] | None) -> dict[str, Any]:
    costs, seq_len = CostModel.of(model, adapter, image_size), mac_length(model, adapter)
    slim, dense = costs.model_macs(seq_len), costs.dense(seq_len)
    described = {
        "model_type": model.config.model_type,
        "architecture": type(model).__name__,
        "pruned": bool(getattr(model.config, "optin", None)),
        **layer_counts(model, adapter),
        "macs": {"per_example": slim, "dense_per_example": dense, "ratio": slim / dense, "seq_len": seq_len},
    }
    labels = getattr(model.config, "id2label", None)
    if labels and getattr(model.config, "num_labels", 0) == len(labels):
        described["id2label"] = {str(k): v for k, v in labels.items()}
    return described


def export_graph(model: nn.Module, path: str | Path, *, opset: int = DEFAULT_OPSET, atol: float = ATOL,
                 rtol: float = RTOL, processor: Any = None, image_size: Sequence[int] | None = None) -> dict[str, Any]:
    """Trace `model` into the ONNX file `path` (a vision model at `image_size`, see `GraphInputs.of`) and validate
    it (`validate`); what was exported, as a JSON-ready mapping. No folder logic: `export_onnx` writes a deployable
    folder, `compare_latency` a throw-away graph."""
    adapter = check_exportable(model, opset)
    if not (0 <= atol < float("inf") and 0 <= rtol < float("inf")):
        _fail(f"atol={atol!r}, rtol={rtol!r}: the tolerances are finite numbers >= 0 (default atol={ATOL:g}, rtol={RTOL:g}).")
    was_training = model.training
    model.eval()
    try:
        spec = GraphInputs.of(model, adapter, image_size)
        batches = validation_batches(model, spec, processor)
        outputs = trace(model, Path(path), spec, opset, batches)
        try:
            graph = session(path)
        except ORT_ERRORS as err:
            _fail(f"ONNX Runtime could not load the exported {model.config.model_type} graph: {err} Nothing was written.")
        runs = validate(model, graph, batches, atol, rtol)
    finally:
        model.train(was_training)
    graph = {
        "file": Path(path).name,
        "opset": opset,
        "exporter": f"torch.onnx.export (TorchScript tracer, dynamo=False), torch {torch.__version__}",
        "inputs": spec.describe(model),
        "outputs": outputs,
        "attention": "unfused: each layer's MatMul/Softmax subgraph with its own head count (no fusion with one "
        "global head count); ORT session optimisations at any level are safe",
    }
    if spec.image_size is not None and not spec.any_image_size:
        graph["image_size"] = list(spec.image_size)
    schedule = installed_schedule(model)
    if schedule is not None:
        graph["token_schedule"] = schedule  # tokens each layer holds after merging: fixed by the image size
    if spec.image_size is None:
        graph["max_sequence_length"] = getattr(model.config, "max_position_embeddings", None)
    return {
        "model": describe_model(model, adapter, spec.image_size),
        "graph": graph,
        "validation": {
            "rule": f"|ort - torch| <= atol + rtol * |torch| for every output element, atol={atol:g}, rtol={rtol:g}",
            "tolerance": {"atol": atol, "rtol": rtol},
            "session": f"onnxruntime {ort.__version__}, CPUExecutionProvider, graph_optimization_level ORT_ENABLE_ALL",
            "runs": runs,
        },
        "versions": {"torch": torch.__version__, "onnx": onnx.__version__, "onnxruntime": ort.__version__,
                     "python": platform.python_version()},
    }
