"""Does the slim model keep its speed-up in ONNX Runtime? Dense vs slim latency in ORT and in PyTorch.

A pruned checkpoint (e.g. `optimum-cli optin prune --output DIR`, the bbc-news default at 0.6) and its dense base
model (the one its optin_config.json names, real weights) are exported to ONNX (validated against PyTorch), then
the four runners (dense and slim, ORT and PyTorch) are timed in turns on the same unpadded batch of seq_len
tokens (the length the MACs were counted at), at each batch size and thread count (the same for both runtimes).
ORT is compared with ORT only, PyTorch with PyTorch; each speed-up is a ratio of medians, set beside 1/MAC ratio
(`share of 1/MAC` = speed-up x MAC ratio; the target for ORT is >= 0.9). Each forward is read by the wall clock and
by the process's CPU time (on one thread, what it costs on an idle machine).

With --accuracy, a checkpoint of an embedded default (its optin_report.json names it) is also run on that default's
held-out test split, in padded batches through its tokenizer, by the exported graph and by PyTorch: their accuracies
and the number of predictions that differ.

    PYTHONPATH=. python benchmarks/onnx_latency.py DIR [--threads 1 2] [--batch-sizes 1 32] [--write-results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path

import onnxruntime
import torch
from torch import nn

from optin_hf import AutoOptinModel
from optin_hf.export import ONNX_MODEL_NAME, export_onnx
from optin_hf.export.latency import compare_latency, dense_twin
from optin_hf.export.to_onnx import session
from optin_hf.hub import download_base_model
from optin_hf.modeling import model_class
from optin_hf.result import pruning_result
from results import RESULTS, write_section

SECTION = "ONNX Runtime latency (issue 23)"


def dense_base(slim: nn.Module, source: str) -> tuple[nn.Module, str]:
    """The dense model the checkpoint was pruned from, with its real weights; the dense twin (random weights) when
    the checkpoint records no base."""
    optin = pruning_result(slim).config
    if not optin.base_model_name_or_path:
        return dense_twin(slim), "dense twin (random weights: the checkpoint names no base model)"
    folder, config = download_base_model(optin.base_model_name_or_path, optin.base_model_revision, source, allow_local=True)
    if optin.base_model_class:
        config.architectures = [optin.base_model_class]
    model = model_class(config).from_pretrained(folder, config=config, use_safetensors=True, trust_remote_code=False)
    return model.eval(), f"base model {optin.base_model_name_or_path} (real weights)"


@torch.no_grad()
def test_accuracy(folder: str, slim: nn.Module, batch_size: int = 32) -> str:
    """Accuracy of the exported graph and of PyTorch on the embedded default's test split, and their disagreements."""
    from optin_hf.tasks.defaults import load_default

    default = json.loads((Path(folder) / "optin_report.json").read_text())["data"]["default"]
    task = load_default(default)
    max_length = pruning_result(slim).config.max_length
    with tempfile.TemporaryDirectory() as tmp:
        export_onnx(slim, Path(tmp) / "onnx", processor=task.processor)
        graph = session(Path(tmp) / "onnx" / ONNX_MODEL_NAME)
        names = [i.name for i in graph.get_inputs()]
        texts, labels = task.test["text"], task.test["label"]
        ort_pred, torch_pred = [], []
        for start in range(0, len(texts), batch_size):
            batch = task.processor(texts[start:start + batch_size], padding=True, truncation=True,
                                   max_length=max_length, return_tensors="pt")
            ort_pred += graph.run(["logits"], {n: batch[n].numpy() for n in names})[0].argmax(-1).tolist()
            torch_pred += slim(**batch).logits.argmax(-1).tolist()
    right = lambda preds: sum(p == y for p, y in zip(preds, labels)) / len(labels)  # noqa: E731
    differ = sum(a != b for a, b in zip(ort_pred, torch_pred))
    return (f"Test accuracy of the slim model on {default}'s {len(labels)} held-out test texts (padded batches of "
            f"{batch_size}, max_length {max_length}): ONNX Runtime {right(ort_pred):.4f}, PyTorch {right(torch_pred):.4f}; "
            f"{differ} prediction(s) differ.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("model", metavar="DIR", help="a pruned checkpoint folder (or Hub repo)")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2], help="thread counts, each for both runtimes")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 32])
    parser.add_argument("--runs", type=int, default=9)
    parser.add_argument("--accuracy", action="store_true", help="also compare test accuracy, ORT vs PyTorch (embedded defaults)")
    parser.add_argument("--write-results", action="store_true", help=f"replace the '{SECTION}' section of {RESULTS.name}")
    args = parser.parse_args()

    load = os.getloadavg()[0]
    slim = AutoOptinModel.from_pretrained(args.model, torch_dtype="float32")
    dense, dense_what = dense_base(slim, args.model)
    rows, ratio, seq_len = [], None, None
    for threads in args.threads:
        measured = compare_latency(dense, slim, args.batch_sizes, threads=threads, runs=args.runs)
        ratio, seq_len = measured["mac_ratio"], measured["seq_len"]
        for batch, row in measured["batches"].items():
            for runtime, name in (("onnxruntime", "ONNX Runtime"), ("pytorch", "PyTorch")):
                r = row[runtime]
                rows.append(f"| {name} | {batch} | {threads} | {r['dense_ms']:.1f} / {r['slim_ms']:.1f} | "
                            f"{r['speedup']:.2f}x | **{r['share_of_ideal']:.2f}** | {r['cpu_dense_ms']:.1f} / "
                            f"{r['cpu_slim_ms']:.1f} | {r['cpu_speedup']:.2f}x | **{r['cpu_share_of_ideal']:.2f}** |")
    heads = " ".join(map(str, slim.config.optin["heads_per_layer"]))
    lines = [
        f"{args.model}: {type(slim).__name__}, heads kept per layer {heads}; MAC ratio {ratio:.3f} at {seq_len} tokens, "
        f"so 1/MAC = {1 / ratio:.2f}x. Dense: {dense_what}.",
        f"Unpadded batches of {seq_len} tokens, medians of {args.runs} interleaved runs per runner; the same thread "
        f"count for ORT (intra-op; inter-op 1, ORT_ENABLE_ALL, CPUExecutionProvider) and PyTorch. torch "
        f"{torch.__version__}, onnxruntime {onnxruntime.__version__}, Python {platform.python_version()}, "
        f"{len(os.sched_getaffinity(0))} CPU cores, load average {load:.1f} at the start (a shared machine: other "
        "processes ran at the same time). One run. Share of 1/MAC = speed-up x MAC ratio (target for ONNX Runtime: >= 0.9).",
        "",
        "| runtime | batch | threads | wall ms, dense / slim | wall speed-up | share of 1/MAC | CPU ms, dense / slim "
        "| CPU speed-up | share of 1/MAC |",
        "|---|---|---|---|---|---|---|---|---|",
        *rows,
    ]
    if args.accuracy:
        lines += ["", test_accuracy(args.model, slim)]
    text = "\n".join(lines)
    print(text)
    if args.write_results:
        write_section(SECTION, text)


if __name__ == "__main__":
    main()
