"""Safe, faithful loading (optin_hf/modeling.py, checkpoint.py, hub/download.py, tasks/workflow.py): no repository
code runs, no file outside a checkpoint is read, nothing is unpickled, the saved dtype comes back, and broken inputs
give one clear error."""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path

import pytest
import torch
from huggingface_hub import create_repo, upload_folder
from hub_server import FakeHub
from tiny import batch, calibration, output, tiny_model
from transformers import BertForMaskedLM, BertForSequenceClassification

from optin_hf import AutoOptinModel, ImportanceScores, OptinConfig, OptinPruner, PruningMasks
from optin_hf import modeling
from optin_hf.checkpoint import save_pruned
from optin_hf.commands.__main__ import main
from optin_hf.tasks.workflow import load_model

SUPPORTED = r"optin-hf supports model_type \[[^]]*'bert', [^]]*'vit'[^]]*\]"  # others may be registered


def pruned(name: str = "bert", seed: int = 0, **settings) -> tuple[torch.nn.Module, OptinPruner]:
    model = tiny_model(name, seed=seed)
    settings = {"mac_constraint": 0.5, "importance": "random", "seq_len": 12, "seed": seed, **settings}
    pruner = OptinPruner(OptinConfig(**settings))
    pruner.prune_model(model, calibration(name))
    return model, pruner


def saved(tmp_path: Path, name: str = "ckpt", **kwargs) -> tuple[Path, torch.nn.Module]:
    model, pruner = pruned(**kwargs)
    pruner.save(model, tmp_path / name)
    return tmp_path / name, model


def masks_only_folder(folder: Path, base: str, masks: PruningMasks) -> Path:
    """A masks-only checkpoint (as push_to_hub writes it) naming `base`, without refit parameters."""
    folder.mkdir()
    OptinConfig(base_model_name_or_path=base, base_model_class="BertForSequenceClassification", reconstruct="none")\
        .save_pretrained(folder)
    masks.save(folder / "optin_masks.safetensors")
    return folder


def evil_folder(folder: Path, marker: Path) -> Path:
    """A checkpoint whose config names its own model type and code; running that code writes `marker`."""
    folder.mkdir()
    code = f"open({str(marker)!r}, 'w').write('ran')\nfrom transformers import PretrainedConfig\n"
    (folder / "configuration_evil.py").write_text(code + "class EvilConfig(PretrainedConfig):\n    model_type = 'evil'\n")
    config = {"model_type": "evil", "auto_map": {"AutoConfig": "configuration_evil.EvilConfig"}, "architectures": ["X"]}
    (folder / "config.json").write_text(json.dumps(config))
    PruningMasks(torch.ones(3, 4), torch.ones(3, 48)).save(folder / "optin_masks.safetensors")
    return folder


def test_a_repo_with_its_own_code_is_refused_before_anything_runs(hub_server: FakeHub, tmp_path: Path) -> None:
    marker = tmp_path / "code-ran"
    folder = evil_folder(tmp_path / "evil", marker)
    with pytest.raises(ValueError, match=rf"is a 'evil' model: {SUPPORTED} only, and never runs"):
        AutoOptinModel.from_pretrained(folder)
    with pytest.raises(ValueError, match=rf"is a 'evil' model: {SUPPORTED}"):
        load_model(str(folder))  # optimum-cli optin prune --model
    repo_id = create_repo("evil").repo_id
    upload_folder(repo_id=repo_id, folder_path=folder)
    with pytest.raises(ValueError, match=rf"test-user/evil is a 'evil' model: {SUPPORTED}"):
        AutoOptinModel.from_pretrained(repo_id)
    # A masks-only repo on the Hub whose base model carries code.
    masks_repo = masks_only_folder(tmp_path / "masks", repo_id, PruningMasks(torch.ones(3, 4), torch.ones(3, 48)))
    upload_folder(repo_id=create_repo("on-evil").repo_id, folder_path=masks_repo)
    with pytest.raises(ValueError, match=r"The base model 'test-user/evil' of test-user/on-evil is a 'evil' model"):
        AutoOptinModel.from_pretrained("test-user/on-evil")
    assert not marker.exists()


@pytest.mark.parametrize("outside", ["../outside/model-00001-of-00002.safetensors", "ABSOLUTE"])
def test_a_weights_index_may_only_name_files_inside_the_checkpoint(tmp_path: Path, outside: str) -> None:
    folder, _ = saved(tmp_path)
    shutil.rmtree(folder)
    model, pruner = pruned()
    pruner.save(model, folder, max_shard_size=40_000)
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    first = sorted(set(index["weight_map"].values()))[0]
    (tmp_path / "outside").mkdir()
    shutil.move(folder / first, tmp_path / "outside" / first)  # a real shard: on main it loaded from there
    outside = str(tmp_path / "outside" / first) if outside == "ABSOLUTE" else outside
    index["weight_map"] = {key: outside if file == first else file for key, file in index["weight_map"].items()}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    with pytest.raises(ValueError, match=rf"names the weights file '{outside}', which is not a plain file name in"):
        AutoOptinModel.from_pretrained(folder)


def test_a_hub_masks_only_repo_may_only_name_a_hub_base(hub_server: FakeHub, tmp_path: Path) -> None:
    base = tiny_model("bert")
    base.save_pretrained(tmp_path / "base")
    model, pruner = pruned(reconstruct="none")
    expected = output(model, batch("bert"))
    repo = masks_only_folder(tmp_path / "repo", str(tmp_path / "base"), pruner.masks)
    repo_id = create_repo("names-a-local-base").repo_id
    upload_folder(repo_id=repo_id, folder_path=repo)
    with pytest.raises(ValueError, match=r"names-a-local-base names the base model '/.*base', which is not a Hub repo"
                                         r" id.*base_model=PATH"):
        AutoOptinModel.from_pretrained(repo_id)
    for given in (str(tmp_path / "base"), tiny_model("bert")):  # the caller's own word
        assert torch.equal(output(AutoOptinModel.from_pretrained(repo_id, base_model=given, attn_implementation="eager"), batch("bert")), expected)
    with pytest.raises(ValueError, match="were made on a BertForSequenceClassification, and base_model is a BertModel"):
        AutoOptinModel.from_pretrained(repo_id, base_model=tiny_model("bert-encoder"))
    # The user's own local masks-only folder may keep naming a local base.
    assert torch.equal(output(AutoOptinModel.from_pretrained(repo, attn_implementation="eager"), batch("bert")), expected)


def test_a_bin_only_dense_model_is_refused_with_the_conversion_hint(tmp_path: Path, monkeypatch, capsys) -> None:
    model = tiny_model("bert")
    model.config.save_pretrained(tmp_path / "bin-only")
    torch.save(model.state_dict(), tmp_path / "bin-only" / "pytorch_model.bin")  # as older transformers wrote
    unpickled = []
    monkeypatch.setattr(torch, "load", lambda *a, **k: unpickled.append(a))
    with pytest.raises(OSError, match=r"has no safetensors weights .* never loads pickled \.bin weights.*save_pretrained"):
        load_model(str(tmp_path / "bin-only"))
    assert main(["prune", "--model", str(tmp_path / "bin-only"), "--dataset", "unused"]) == 1
    assert "never loads pickled .bin weights" in capsys.readouterr().err and not unpickled


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_a_half_precision_checkpoint_reloads_in_its_dtype(tmp_path: Path, dtype: torch.dtype) -> None:
    model, pruner = pruned()
    model.to(dtype)
    pruner.save(model, tmp_path / "half")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "half", attn_implementation="eager")  # as tiny_model
    assert {p.dtype for p in loaded.parameters()} == {dtype} and loaded.config.dtype == dtype
    assert torch.equal(output(loaded, batch("bert")), output(model, batch("bert")))
    wider = AutoOptinModel.from_pretrained(tmp_path / "half", torch_dtype="float32")
    assert {p.dtype for p in wider.parameters()} == {torch.float32}
    assert {p.dtype for p in AutoOptinModel.from_pretrained(tmp_path / "half", dtype=torch.float32).parameters()} == {
        torch.float32
    }
    with pytest.raises(ValueError, match="Unknown torch_dtype 'float8'"):
        AutoOptinModel.from_pretrained(tmp_path / "half", torch_dtype="float8")


def test_a_dtype_that_is_not_a_float_is_refused_before_any_file_is_read(tmp_path: Path) -> None:
    for dtype in (torch.int8, torch.bool, torch.uint8, torch.complex64, torch.float64, "int8", 16):
        with pytest.raises(
            ValueError, match=rf"Unknown torch_dtype {re.escape(repr(dtype))}: use one of \['bfloat16', 'float16', 'float32'\]"
        ):
            AutoOptinModel.from_pretrained(tmp_path / "not-read", torch_dtype=dtype)


def test_a_local_base_replaced_by_other_weights_is_refused(tmp_path: Path) -> None:
    base = tiny_model("bert")
    base.save_pretrained(tmp_path / "base")
    model = BertForSequenceClassification.from_pretrained(tmp_path / "base", attn_implementation="eager")  # names it
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12))
    pruner.prune_model(model, calibration("bert"))
    save_pruned(model, tmp_path / "masks", masks_only=True)
    expected = output(model, batch("bert"))
    assert torch.allclose(output(AutoOptinModel.from_pretrained(tmp_path / "masks"), batch("bert")), expected, atol=1e-5)
    shutil.rmtree(tmp_path / "base")
    tiny_model("bert", seed=5).save_pretrained(tmp_path / "base")  # the same config, other weights
    with pytest.raises(
        ValueError,
        match=rf"The base model {tmp_path / 'base'} of {tmp_path / 'masks'} holds other weights than the ones its masks "
        r"were made on .*Pass the base the masks were made on \(base_model=\.\.\.\), or prune this base again",
    ):
        AutoOptinModel.from_pretrained(tmp_path / "masks")
    shutil.rmtree(tmp_path / "base")
    base.save_pretrained(tmp_path / "base", max_shard_size="20KB")  # the same weights, sharded: still accepted
    assert len(list((tmp_path / "base").glob("model-*.safetensors"))) > 1
    assert torch.allclose(output(AutoOptinModel.from_pretrained(tmp_path / "masks"), batch("bert")), expected, atol=1e-5)
    shard = sorted((tmp_path / "base").glob("model-*.safetensors"))[0]
    intact = shard.read_bytes()
    shard.write_bytes(intact[: len(intact) // 2])  # a base cut short: one error naming the file, not a raw SafetensorError
    with pytest.raises(ValueError, match=rf"{shard} is not a valid safetensors weights file"):
        AutoOptinModel.from_pretrained(tmp_path / "masks")
    shard.write_bytes(intact)
    # A checkpoint saved before fingerprints loads as it did, with a warning.
    config = json.loads((tmp_path / "masks" / "optin_config.json").read_text())
    del config["base_model_fingerprint"]
    (tmp_path / "masks" / "optin_config.json").write_text(json.dumps(config))
    with pytest.warns(UserWarning, match=r"records no fingerprint of the weights of its base model .*Saving the loaded model again records one"):
        AutoOptinModel.from_pretrained(tmp_path / "masks")
    for weights in (tmp_path / "base").glob("model*.safetensors*"):
        weights.unlink()  # a base no masks-only checkpoint could load over
    with pytest.raises(ValueError, match=r"base model folder .*base has no safetensors weights .*\(masks_only=False\)"):
        save_pruned(model, tmp_path / "masks-2", masks_only=True)


def test_the_slim_model_is_built_on_the_meta_device(tmp_path: Path, monkeypatch) -> None:
    folder, model = saved(tmp_path)
    seen: list[set[str]] = []

    def recording_slim(dense: torch.nn.Module, masks: PruningMasks, adapter=None) -> torch.nn.Module:
        seen.append({p.device.type for p in dense.parameters()})
        return slim_model(dense, masks, adapter)

    slim_model = modeling.slim_model
    monkeypatch.setattr(modeling, "slim_model", recording_slim)
    loaded = AutoOptinModel.from_pretrained(folder, attn_implementation="eager")
    assert seen == [{"meta"}]  # the dense model never held real parameters
    assert not [n for n, t in [*loaded.named_parameters(), *loaded.named_buffers()] if t.is_meta]
    position_ids = loaded.bert.embeddings.position_ids  # a non-persistent buffer, not in the weights
    assert torch.equal(position_ids, torch.arange(position_ids.shape[-1])[None])
    assert torch.equal(output(loaded, batch("bert")), output(model, batch("bert")))


def test_tied_weights_come_back_tied(tmp_path: Path) -> None:
    torch.manual_seed(0)
    model = BertForMaskedLM(tiny_model("bert").config).eval()
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12, reconstruct="none"))
    pruner.prune_model(model, calibration("bert"))
    pruner.save(model, tmp_path / "mlm")
    loaded = AutoOptinModel.from_pretrained(tmp_path / "mlm", attn_implementation="eager")
    assert loaded.cls.predictions.decoder.weight is loaded.bert.embeddings.word_embeddings.weight
    assert torch.equal(output(loaded, batch("bert")), output(model, batch("bert")))


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("device_map", ["cpu", "auto", {"": "cpu"}])
def test_attn_implementation_and_device_map_are_honoured(tmp_path: Path, attn: str, device_map) -> None:
    folder, model = saved(tmp_path)
    loaded = AutoOptinModel.from_pretrained(folder, attn_implementation=attn, device_map=device_map)
    assert loaded.config._attn_implementation == attn
    assert {p.device.type for p in loaded.parameters()} == {"cpu"}
    torch.testing.assert_close(output(loaded, batch("bert")), output(model, batch("bert")))


def test_masks_that_do_not_belong_to_the_weights_are_named(tmp_path: Path, capsys) -> None:
    folder, _ = saved(tmp_path)
    other, _ = saved(tmp_path, "other", seed=3, mac_constraint=0.3)
    shutil.copy(other / "optin_masks.safetensors", folder / "optin_masks.safetensors")
    with pytest.raises(ValueError, match=r"do not fit the model that its optin_masks.safetensors describes: .* is \["):
        AutoOptinModel.from_pretrained(folder)
    assert main(["evaluate", "--model", str(folder)]) == 1
    err = capsys.readouterr().err
    assert "optin_masks.safetensors describes" in err and "Traceback" not in err


def test_an_empty_rankings_pickle_is_named(tmp_path: Path) -> None:
    (tmp_path / "head.pkl").write_bytes(b"")
    with pytest.raises(ValueError, match=r"head\.pkl is empty or cut short: not a complete rankings pickle"):
        ImportanceScores.from_reference_rankings(tmp_path / "head.pkl", tmp_path / "head.pkl", tiny_model("vit").config)


def test_a_junk_raw_losses_file_is_named_on_resume(tmp_path: Path) -> None:
    (tmp_path / "raw_losses.process0.safetensors").write_bytes(b"junk, not safetensors")
    pruner = OptinPruner(OptinConfig(importance="optin", num_samples=4, checkpoint_dir=str(tmp_path), seq_len=12))
    with pytest.raises(ValueError, match=r"raw_losses\.process0\.safetensors is not a readable raw-losses file .*Delete"):
        pruner.compute_scores(tiny_model("bert"), calibration("bert", n=4))
