"""`model.config.optin` is derived from the model's `PruningResult` (optin_hf/result.py `record_optin`), the one
source: after pruning, after loading a full or masks-only checkpoint, and when a result is attached by hand."""

from __future__ import annotations

import ast
import json
from pathlib import Path

import pytest
from tiny import calibration, tiny_model

import optin_hf
from optin_hf import AutoOptinModel, OptinConfig, OptinPruner
from optin_hf.checkpoint import save_pruned
from optin_hf.reconstruct import reconstruct
from optin_hf.result import PruningResult, attach_result, pruning_result
from optin_hf.slim import slim_model

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny models run far faster on one thread


def derived(result: PruningResult) -> dict:
    """What config.json must say of a model with this result."""
    masks = result.masks
    optin = {"heads_per_layer": masks.heads_per_layer(), "neurons_per_layer": masks.neurons_per_layer()}
    return optin if result.config.reconstruct == "none" else {**optin, "reconstruct": result.config.reconstruct}


@pytest.mark.parametrize("masks_only", [False, True])
def test_loaded_config_optin_is_derived_from_the_result(tmp_path: Path, masks_only: bool):
    model, base = tiny_model("bert"), tmp_path / "base"
    model.save_pretrained(base)
    settings = OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct="weights",
                           base_model_name_or_path=str(base))
    OptinPruner(settings).prune_model(model, calibration("bert"))
    assert model.config.optin == derived(pruning_result(model))
    folder = tmp_path / "ckpt"
    save_pruned(model, folder, masks_only=masks_only)
    if not masks_only:  # a stale copy in config.json is not read back: the result (optin_config.json) is the source
        config = json.loads((folder / "config.json").read_text())
        del config["optin"]["reconstruct"]
        (folder / "config.json").write_text(json.dumps(config))
    loaded = AutoOptinModel.from_pretrained(folder)
    assert loaded.config.optin == derived(pruning_result(loaded)) == model.config.optin
    assert loaded.config.optin["reconstruct"] == "weights"


def test_attach_result_writes_config_optin():
    model, dense = tiny_model("bert"), tiny_model("bert")
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct="none"))
    masks = pruner.compute_masks(model, calibration("bert"))
    slim_model(model, masks)
    assert "reconstruct" not in model.config.optin  # slimming alone repairs nothing
    batches = [{k: v.unsqueeze(0) for k, v in example.items()} for example in calibration("bert", n=2)]
    repair = reconstruct(model, dense, batches, "weights")
    attach_result(model, PruningResult(OptinConfig(reconstruct="weights"), masks, repair))
    assert model.config.optin == derived(pruning_result(model))
    assert model.config.optin["reconstruct"] == "weights"


def writes_config_optin(node: ast.AST) -> bool:
    """Whether `node` assigns `<...>.optin` or an item of it."""
    if isinstance(node, ast.Assign):
        targets = node.targets
    else:
        targets = [node.target] if isinstance(node, (ast.AugAssign, ast.AnnAssign)) else []
    for target in targets:
        while isinstance(target, ast.Subscript):
            target = target.value
        if isinstance(target, ast.Attribute) and target.attr == "optin":
            return True
    return False


def test_only_result_py_writes_config_optin():
    package = Path(optin_hf.__file__).parent
    writers = sorted(
        str(path.relative_to(package))
        for path in package.rglob("*.py")
        if any(writes_config_optin(node) for node in ast.walk(ast.parse(path.read_text())))
    )
    assert writers == ["result.py"]
