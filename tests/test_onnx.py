"""ONNX export (`optin_hf.export`): every family that traces exports from a checkpoint folder and runs in ONNX Runtime
as it runs in PyTorch, on shapes it was not traced on; what cannot be exported is refused in one message, writing
nothing; attention is never fused with one global head count; the CLI writes the same folder."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch
from test_commands import optimum_cli
from test_conformance import random_masks
from tiny import family, tiny_model
from tiny_task import trained_text_model
from torch import nn
from transformers import AutoModelForSequenceClassification

from optin_hf import OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.arch import check_model
from optin_hf.checkpoint import save_pruned
from optin_hf.commands.__main__ import main
from optin_hf.export import ONNX_CONFIG_NAME, ONNX_MODEL_NAME, export_onnx
from optin_hf.export.settings import ATOL, RTOL
from optin_hf.export.to_onnx import ORT_ERRORS, forward_options, session

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models: one thread for torch and ORT alike

# The encoder families and the decoders (without KV cache). GPT-2 is left out: a GPT-2 layer that keeps no
# FFN neuron runs its Conv1D's view to zero features, which ONNX's Reshape reads as "copy that dimension".
FAMILIES = ("bert", "roberta", "distilbert", "vit", "deit", "swin", "resnet", "convnext", "segformer", "dinov2",
            "mask2former", "llama", "mistral", "qwen2", "qwen3")
ANY_SIZE = ("resnet", "convnext", "segformer")  # the families whose graph takes any image size
FUSED_OPS = {"Attention", "MultiHeadAttention"}


def slim(model: nn.Module, masks: PruningMasks | None = None) -> nn.Module:
    """`model` slimmed with uneven masks (`random_masks`: layer 0 keeps no head, the last layer no neuron)."""
    return OptinPruner(OptinConfig(reconstruct="none")).prune_model(model, masks=masks or random_masks(model))


def fresh_inputs(model: nn.Module, model_type: str) -> dict[str, torch.Tensor]:
    """A batch of 5 the export never ran: text of 9 tokens with padding, images (of another size where the graph
    takes any)."""
    g = torch.Generator().manual_seed(7)
    if check_model(model).is_vision:
        size = family(model_type).inputs["pixel_values"].shape[-1] + (16 if model_type in ANY_SIZE else 0)
        return {"pixel_values": torch.randn(5, 3, size, size, generator=g)}
    ids = torch.randint(5, model.config.vocab_size, (5, 9), generator=g)
    mask = torch.ones_like(ids)
    mask[2, 6:] = 0
    inputs = {"input_ids": ids, "attention_mask": mask}
    if getattr(model.config, "type_vocab_size", 1) > 1:
        inputs["token_type_ids"] = torch.randint(0, 2, (5, 9), generator=g)
    return inputs


def ort_and_torch(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(output name, ORT's value, PyTorch's value) for each output of the graph at `path`."""
    graph = session(path)
    names = [o.name for o in graph.get_outputs()]
    got = graph.run(names, {k: v.numpy() for k, v in inputs.items()})
    with torch.no_grad():
        out = model(**inputs, **forward_options(model))
    return [(name, value, out[name].numpy()) for name, value in zip(names, got, strict=True)]


def assert_runs_as_pytorch(path: Path, model: nn.Module, inputs: dict[str, torch.Tensor]) -> None:
    for name, got, want in ort_and_torch(path, model, inputs):
        np.testing.assert_allclose(got, want, atol=ATOL, rtol=RTOL, err_msg=name)


def fused_ops(path: Path, tmp_path: Path) -> set[str]:
    """The fused attention operators in the graph ORT runs after its own session optimisations (ORT_ENABLE_ALL)."""
    options = ort.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / "optimized.onnx")
    options.log_severity_level = 3
    ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    return {node.op_type for node in onnx.load(options.optimized_model_filepath).graph.node} & FUSED_OPS


@pytest.mark.parametrize("model_type", FAMILIES)
def test_every_family_exports_from_its_checkpoint_and_runs_in_ort_as_in_pytorch(model_type, tmp_path):
    tiny = family(model_type)
    model = slim(tiny.build())
    tiny.eager(model)
    save_pruned(model, tmp_path / "slim")
    described = export_onnx(tmp_path / "slim", tmp_path / "onnx")

    files = {p.name for p in (tmp_path / "onnx").iterdir()}
    assert {ONNX_MODEL_NAME, ONNX_CONFIG_NAME} <= files and "config.json" not in files  # never the dense config
    assert json.loads((tmp_path / "onnx" / ONNX_CONFIG_NAME).read_text()) == json.loads(json.dumps(described))
    kept = described["model"]
    assert kept["heads_per_layer"] == model.config.optin["heads_per_layer"] and kept["heads_per_layer"][0] == 0
    assert kept["neurons_per_layer"] == model.config.optin["neurons_per_layer"]
    assert kept["neurons_per_layer"][-1] == 0 and kept["neurons_per_layer"] != kept["dense_neurons_per_layer"]
    seq_len = kept["macs"]["seq_len"]
    assert kept["macs"]["per_example"] == pytest.approx(count_macs(model, seq_len))
    runs = described["validation"]["runs"]
    assert len(runs) == 2 and all(0 <= error <= ATOL for run in runs for error in run["max_abs_error"].values())
    wanted = {"class_queries_logits", "masks_queries_logits"} if model_type == "mask2former" else {"logits"}
    assert wanted <= {o["name"] for o in described["graph"]["outputs"]}
    assert described["graph"]["inputs"][0]["shape"][0] == "batch"
    # a batch size, text length (or image size) the export never ran, checked here, not by the export
    assert_runs_as_pytorch(tmp_path / "onnx" / ONNX_MODEL_NAME, model, fresh_inputs(model, model_type))
    assert not fused_ops(tmp_path / "onnx" / ONNX_MODEL_NAME, tmp_path)


@pytest.mark.parametrize("model_type", FAMILIES)
def test_a_model_not_in_float32_is_refused_writing_nothing(model_type, tmp_path):
    model = slim(family(model_type).build()).to(torch.bfloat16)
    with pytest.raises(ValueError, match=r"^The model's weights are \['torch.bfloat16'\]: export a float32 model"):
        export_onnx(model, tmp_path / "onnx")
    assert not (tmp_path / "onnx").exists()


def test_fusing_attention_with_one_global_head_count_breaks_a_ragged_model(tmp_path):
    """ORT's transformer optimizer fuses every layer with the config's head count: on layers keeping 0, 1 and 4
    heads its graph computes other logits than PyTorch (or fails to run), while the export matches."""
    from onnxruntime.transformers.optimizer import optimize_model

    model = tiny_model("bert")
    full = PruningMasks.full(model.config)
    heads = full.head_mask.clone()
    heads[0], heads[1, 1:] = False, False
    slim(model, dataclasses.replace(full, head_mask=heads))
    assert model.config.optin["heads_per_layer"] == [0, 1, 4]
    export_onnx(model, tmp_path / "onnx")
    path = tmp_path / "onnx" / ONNX_MODEL_NAME
    inputs = fresh_inputs(model, "bert")
    assert_runs_as_pytorch(path, model, inputs)
    assert not fused_ops(path, tmp_path)

    fused = optimize_model(str(path), model_type="bert", num_heads=model.config.num_attention_heads,
                           hidden_size=model.config.hidden_size)
    assert fused.get_fused_operator_statistics()["Attention"] > 0  # the global route did fuse
    fused.save_model_to_file(str(tmp_path / "fused.onnx"))
    try:
        [(_, got, want)] = ort_and_torch(tmp_path / "fused.onnx", model, inputs)
    except ORT_ERRORS:  # a graph ORT cannot load or run fails the route as surely
        return
    assert not np.allclose(got, want, atol=ATOL, rtol=RTOL), "one global head count gave the ragged model's logits"


def test_a_masks_only_checkpoint_exports_with_its_base_models_tokenizer(tmp_path):
    trained_text_model(tmp_path / "base")  # a BERT with its tokenizer
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base").eval()
    slim(model)
    save_pruned(model, tmp_path / "masks", masks_only=True)  # the masks, naming the base folder; no tokenizer
    assert not {"model.safetensors", "tokenizer.json"} & {p.name for p in (tmp_path / "masks").iterdir()}
    described = export_onnx(tmp_path / "masks", tmp_path / "onnx")
    assert described["source"] == str(tmp_path / "masks") and described["preprocessor"]
    assert described["validation"]["runs"][0]["inputs"] == "3 sentences through the model's tokenizer"
    assert (tmp_path / "onnx" / "tokenizer_config.json").is_file()
    assert_runs_as_pytorch(tmp_path / "onnx" / ONNX_MODEL_NAME, model, fresh_inputs(model, "bert"))


def test_token_merging_exports_at_its_image_size(tmp_path):
    model = tiny_model("vit")
    full = PruningMasks.full(model.config)
    slim(model, dataclasses.replace(full, token_schedule=torch.tensor([17, 13, 9])))
    described = export_onnx(model, tmp_path / "onnx")
    assert described["graph"]["token_schedule"] == [17, 13, 9] and described["graph"]["image_size"] == [16, 16]
    assert_runs_as_pytorch(tmp_path / "onnx" / ONNX_MODEL_NAME, model, fresh_inputs(model, "vit"))


def test_an_output_over_the_tolerance_fails_the_export_and_writes_nothing(tmp_path):
    model = slim(tiny_model("bert"))
    with pytest.raises(ValueError, match=r"differs from PyTorch's by up to .* over the tolerance .* Nothing was written"):
        export_onnx(model, tmp_path / "onnx", atol=0.0, rtol=0.0)
    assert list(tmp_path.iterdir()) == []  # no folder, no temp folder left beside it


def test_the_export_replaces_its_own_folder_and_refuses_any_other(tmp_path):
    model = slim(tiny_model("bert"))
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(FileExistsError, match=r"is not empty \(notes.txt\) and holds no optin_onnx.json"):
        export_onnx(model, tmp_path / "mine")
    assert [p.name for p in (tmp_path / "mine").iterdir()] == ["notes.txt"]
    (tmp_path / "file").write_text("x")
    with pytest.raises(NotADirectoryError, match="is a file"):
        export_onnx(model, tmp_path / "file")

    export_onnx(model, tmp_path / "onnx")
    (tmp_path / "onnx" / "stale.txt").write_text("from the last export's folder")
    described = export_onnx(model, tmp_path / "onnx", atol=2e-4)  # an earlier export: replaced whole
    assert json.loads((tmp_path / "onnx" / ONNX_CONFIG_NAME).read_text())["validation"]["tolerance"]["atol"] == 2e-4
    assert described["validation"]["tolerance"]["atol"] == 2e-4 and not (tmp_path / "onnx" / "stale.txt").exists()
    assert not model.training


@pytest.mark.parametrize("settings, message", [
    ({"opset": 13}, "opset=13: the TorchScript exporter writes ONNX opsets 14 to 20"),
    ({"atol": -1.0}, "atol=-1.0, rtol=0.001: the tolerances are finite numbers >= 0"),
    ({"latency_batch_sizes": (0,)}, r"batch_sizes=\[0\]: each must be at least 1"),
    ({"latency_batch_sizes": (1,), "threads": 0}, "threads=0"),
])
def test_bad_settings_are_refused_writing_nothing(settings, message, tmp_path):
    with pytest.raises(ValueError, match=message):
        export_onnx(slim(tiny_model("bert")), tmp_path / "onnx", **settings)
    assert list(tmp_path.iterdir()) == []


def test_latency_compares_ort_with_ort_and_pytorch_with_pytorch(tmp_path):
    model = slim(tiny_model("bert"))
    described = export_onnx(model, tmp_path / "onnx", latency_batch_sizes=(1, 2), threads=1)
    latency = described["latency"]
    assert latency["threads"] == 1 and set(latency["batches"]) == {"1", "2"}
    ratio = count_macs(model, latency["seq_len"]) / count_macs(tiny_model("bert"), latency["seq_len"])
    assert latency["mac_ratio"] == pytest.approx(ratio) and latency["ideal_speedup"] == pytest.approx(1 / ratio)
    for row in latency["batches"].values():
        for runtime in ("onnxruntime", "pytorch"):
            r = row[runtime]
            assert r["speedup"] == pytest.approx(r["dense_ms"] / r["slim_ms"])
            assert r["share_of_ideal"] == pytest.approx(r["speedup"] * ratio)


def test_the_cli_exports_a_pruned_folder(tmp_path, capsys):
    model = slim(tiny_model("bert"))
    save_pruned(model, tmp_path / "slim")
    result = optimum_cli("optin", "export", "onnx", "--model", str(tmp_path / "slim"), str(tmp_path / "onnx"))
    assert result.returncode == 0, result.stderr
    heads = " ".join(map(str, model.config.optin["heads_per_layer"]))
    assert f"attention heads per layer: {heads} (dense: 4 4 4)" in result.stdout
    assert "ONNX Runtime matches PyTorch: max |difference|" in result.stdout
    assert_runs_as_pytorch(tmp_path / "onnx" / ONNX_MODEL_NAME, model, fresh_inputs(model, "bert"))

    assert main(["export", "onnx", "--model", str(tmp_path / "missing"), str(tmp_path / "out")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: ") and "missing" in err[0]
    assert main(["export", "onnx", "--model", str(tmp_path / "slim"), str(tmp_path / "slim")]) == 1
    assert "holds no optin_onnx.json" in capsys.readouterr().err


@pytest.mark.parametrize("args", [["export"], ["export", "tflite"], ["export", "onnx", "out"],
                                  ["export", "onnx", "--opset", "9", "--model", "m", "out"]])
def test_bad_export_arguments_give_one_line(args, capsys):
    with pytest.raises(SystemExit) as exit:
        main(args)
    lines = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(lines) == 1 and "error:" in lines[0], lines
