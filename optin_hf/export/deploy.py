"""A deployable ONNX folder: the graph (`to_onnx`), `optin_onnx.json` describing what was exported, and the model's
tokenizer or image processor, written atomically; optionally the latency beside dense (`latency`).

The folder never holds a config.json: the one of a slim checkpoint states the dense sizes (its per-layer counts sit
in `optin`), which a tool that reads it would build. optin_onnx.json states the per-layer counts the graph runs.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from torch import nn

from .. import __version__
from ..arch import ArchAdapter
from ..checkpoint import atomic_directory, save_path
from .latency import compare_latency, dense_twin
from .settings import ATOL, DEFAULT_OPSET, RTOL
from .to_onnx import ONNX_MODEL_NAME, check_exportable, export_graph

ONNX_CONFIG_NAME = "optin_onnx.json"


def check_export_target(folder: str | Path) -> Path:
    """The folder an export writes to, resolved; refused when it is a file or a non-empty folder that no export
    wrote (an export replaces its whole folder, so it must never take over the user's files)."""
    folder = save_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is a file: give a folder to export into.")
    if folder.is_dir() and not (folder / ONNX_CONFIG_NAME).is_file():
        names = sorted(p.name for p in folder.iterdir())
        if names:
            shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
            raise FileExistsError(
                f"{folder} is not empty ({shown}) and holds no {ONNX_CONFIG_NAME}, so no ONNX export wrote it: an "
                "export replaces its whole folder. Choose a new or empty folder."
            )
    return folder


def _load(source: str, revision: str | None) -> nn.Module:
    from ..modeling import AutoOptinModel  # the loader pulls in the hub and pruning code: only for a path

    return AutoOptinModel.from_pretrained(source, revision=revision, torch_dtype="float32")


def find_processor(adapter: ArchAdapter, sources: Sequence[str]) -> Any:
    """The tokenizer (text) or image processor of the first of `sources` (local folders or Hub ids) that has one;
    None when none does. Read from the processor files alone, with no repository code."""
    import transformers

    from ..hub.download import PROCESSOR_FILES, download_model

    loader = transformers.AutoImageProcessor if adapter.is_vision else transformers.AutoTokenizer
    # Without its files a tokenizer still loads, from config.json alone, with an empty vocabulary.
    marks = ("preprocessor_config.json",) if adapter.is_vision else ("tokenizer.json", "tokenizer_config.json")
    for source in sources:
        try:
            folder = download_model(source, PROCESSOR_FILES)
            if any((folder / name).is_file() for name in marks):
                return loader.from_pretrained(folder, trust_remote_code=False)
        except (OSError, ValueError):
            continue
    return None


def export_onnx(
    model_or_path: nn.Module | str | Path,
    output_dir: str | Path,
    *,
    revision: str | None = None,
    processor: Any = None,
    opset: int = DEFAULT_OPSET,
    atol: float = ATOL,
    rtol: float = RTOL,
    latency_batch_sizes: Sequence[int] = (),
    threads: int | None = None,
) -> dict[str, Any]:
    """Export an optin-hf model to `output_dir`: `model.onnx`, `optin_onnx.json` describing it, and the model's
    tokenizer or image processor where one is found. Returns what `optin_onnx.json` holds.

    `model_or_path`: a checkpoint folder or Hub repo (full or masks-only, loaded by
    `AutoOptinModel.from_pretrained` at `revision`), or a model in memory (slim or dense, float32). The graph takes
    any batch size and text length (or, for ResNet, ConvNeXt and SegFormer, image size), and is checked in ONNX
    Runtime against PyTorch on inputs it was not traced on: the export fails, writing nothing, if an output differs
    by more than `atol + rtol * |torch|`. With `latency_batch_sizes`, ORT and PyTorch latencies of the slim model and
    of its dense twin are measured at those batch sizes on `threads` threads (`latency.compare_latency`).

    The folder is written atomically (a temp folder renamed into place). An earlier export there is replaced; a
    non-empty folder that no export wrote is refused.
    """
    target = check_export_target(output_dir)  # before the load: a doomed export fails first
    if isinstance(model_or_path, nn.Module):
        model, source = model_or_path, None
    else:
        source = str(model_or_path)
        model = _load(source, revision)
    adapter = check_exportable(model, opset)
    if processor is None and source is not None:  # the checkpoint's own, else its base model's
        result = getattr(model, "optin_result", None)
        base = result.config.base_model_name_or_path if result is not None else None
        processor = find_processor(adapter, [source] + ([base] if base else []))
    with atomic_directory(target) as tmp:
        check_export_target(target)  # again, once atomic_directory has restored an interrupted export
        described = export_graph(model, tmp / ONNX_MODEL_NAME, opset=opset, atol=atol, rtol=rtol, processor=processor)
        described = {
            "format": "optin-hf ONNX export",
            "optin_hf_version": __version__,
            "source": source,
            **described,
            "preprocessor": None if processor is None else type(processor).__name__,
        }
        if processor is not None:
            processor.save_pretrained(tmp)
        if latency_batch_sizes:
            described["latency"] = {"dense": "the same architecture at its unpruned sizes, random weights",
                                    **compare_latency(dense_twin(model), model, latency_batch_sizes, threads=threads)}
        (tmp / ONNX_CONFIG_NAME).write_text(json.dumps(described, indent=2) + "\n")
    return described


def export_summary(described: dict[str, Any], folder: str | Path) -> str:
    """What `export_onnx` wrote, in a few lines for the CLI."""
    model, graph, validation = described["model"], described["graph"], described["validation"]
    macs = model["macs"]
    at = f"{macs['seq_len']:g} tokens" if macs["seq_len"] else "its image size"
    shapes = lambda specs: ", ".join(f"{s['name']} {s['dtype']} [{', '.join(map(str, s['shape']))}]" for s in specs)  # noqa: E731
    errors = max(e for run in validation["runs"] for e in run["max_abs_error"].values())
    lines = [
        f"ONNX export written to {folder}: {graph['file']} (opset {graph['opset']}), {ONNX_CONFIG_NAME}"
        + (f", {described['preprocessor']}" if described["preprocessor"] else ""),
        f"{model['architecture']} ({model['model_type']}), MACs {macs['ratio']:.3f} of the dense model's at {at}",
        f"attention heads per layer: {' '.join(map(str, model['heads_per_layer']))} "
        f"(dense: {' '.join(map(str, model['dense_heads_per_layer']))})",
        f"FFN neurons per layer: {' '.join(map(str, model['neurons_per_layer']))} "
        f"(dense: {' '.join(map(str, model['dense_neurons_per_layer']))})",
        f"inputs: {shapes(graph['inputs'])}",
        f"outputs: {shapes(graph['outputs'])}",
        f"ONNX Runtime matches PyTorch: max |difference| {errors:.2g}, within {validation['rule']}; on "
        + "; ".join(f"{run['inputs']} {run['shape']}" for run in validation["runs"]),
    ]
    latency = described.get("latency")
    if latency:
        tokens = f", {latency['seq_len']} tokens" if latency["seq_len"] else ""
        lines += [
            f"latency, {latency['threads']} thread(s){tokens}, "
            f"median of {latency['runs']} runs in turns; dense: {latency['dense']}; 1/MAC ratio {latency['ideal_speedup']:.2f}x",
            f"{'':22}{'dense ms':>10}{'slim ms':>10}{'speed-up':>10}{'of 1/MAC':>10}{'CPU time:':>11}{'speed-up':>10}"
            f"{'of 1/MAC':>10}",
        ]
        for batch, row in latency["batches"].items():
            for runtime, name in (("onnxruntime", "ONNX Runtime"), ("pytorch", "PyTorch")):
                r = row[runtime]
                lines.append(f"{f'{name}, batch {batch}':22}{r['dense_ms']:10.1f}{r['slim_ms']:10.1f}"
                             f"{r['speedup']:9.2f}x{r['share_of_ideal']:10.2f}{'':11}{r['cpu_speedup']:9.2f}x"
                             f"{r['cpu_share_of_ideal']:10.2f}")
    return "\n".join(lines)
