"""optin_hf/hub/ and the Hub side of AutoOptinModel: real pushes and pulls through huggingface_hub, against the
fake Hub of tests/hub_server.py."""

from __future__ import annotations

import ast
import copy
import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, create_repo, hf_hub_download, list_repo_files, upload_file, upload_folder
from hub_server import FakeHub
from safetensors.torch import load_file
from tiny import batch, calibration, output, tiny_model
from transformers import AutoConfig, AutoModelForSequenceClassification

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, PruningMasks, count_macs
from optin_hf.hub import model_card, push_to_hub, write_repo_folder
from optin_hf.result import pruning_result

ROOT = Path(__file__).resolve().parents[1]
MASKS_ONLY_FILES = {
    ".gitattributes", "README.md", "optin_config.json", "optin_masks.safetensors", "optin_scores.safetensors",
    "optin_reconstruction.safetensors",
}
METRICS = {
    "task_type": "text-classification",
    "dataset_type": "SetFit/bbc-news",
    "dataset_split": "test",
    "pruned": {"accuracy": 0.8},
    "dense": {"accuracy": 0.9},
}


def push_base(tmp_path: Path) -> tuple[str, str]:
    """A tiny fine-tuned-like BERT on the Hub, as save_pretrained writes it; returns (repo id, commit sha)."""
    tiny_model("bert", attn="sdpa").save_pretrained(tmp_path / "base")
    repo_id = create_repo("tiny-bert").repo_id
    return repo_id, upload_folder(repo_id=repo_id, folder_path=tmp_path / "base").oid


def prune(model: torch.nn.Module) -> OptinPruner:
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", seq_len=12))
    pruner.prune_model(model, calibration("bert"))
    return pruner


def test_push_then_pull_masks_only_and_full_online_and_offline(hub_server: FakeHub, tmp_path: Path) -> None:
    base_id, base_sha = push_base(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(base_id)  # name_or_path is the repo id
    pruner = prune(model)
    expected = output(model, batch("bert"))
    masks_repo = pruner.push_to_hub(model, "tiny-bert-optin", metrics=METRICS, speedup=1.5).repo_url.repo_id
    full = pruner.push_to_hub(model, "tiny-bert-optin-full", masks_only=False, max_shard_size=40_000)
    full_repo = full.repo_url.repo_id
    assert (masks_repo, full_repo) == ("test-user/tiny-bert-optin", "test-user/tiny-bert-optin-full")

    assert set(list_repo_files(masks_repo)) == MASKS_ONLY_FILES
    full_files = set(list_repo_files(full_repo))
    assert {"config.json", "model.safetensors.index.json", "optin_config.json", "optin_masks.safetensors"} <= full_files
    assert len([name for name in full_files if name.startswith("model-")]) > 1  # sharded at max_shard_size
    recorded = OptinConfig.from_pretrained(Path(hf_hub_download(masks_repo, "optin_config.json")).parent)
    assert (recorded.base_model_name_or_path, recorded.base_model_revision) == (base_id, base_sha)
    assert recorded.base_model_class == "BertForSequenceClassification" and recorded.mac_constraint == 0.5

    card = ModelCard.load(masks_repo)
    assert card.data.base_model == base_id and {"optin", "pruning"} <= set(card.data.tags)
    results = {(r.metric_type, r.metric_value) for r in card.data.eval_results}
    assert results == {("accuracy", 0.8), ("dense_accuracy", 0.9)}
    assert f'AutoOptinModel.from_pretrained("{masks_repo}")' in card.text and base_sha in card.text
    size = sum(t.numel() * 4 for t in pruner.reconstruction.tensors.values()) / 1e6
    assert "refit by ridge least squares" in card.text and f"`optin_reconstruction.safetensors` ({size:.2f} MB)" in card.text
    heads, neurons = pruner.masks.heads_per_layer(), pruner.masks.neurons_per_layer()
    assert f"| 2 | {heads[2]} / 4 | {neurons[2]} / 48 |" in card.text and "| 1.50x |" in card.text

    # Plain transformers stops on config.json with our message, before downloading a single weight.
    with pytest.raises(ValueError, match=r"optin-hf pruned checkpoint.*optin_hf\.AutoOptinModel\.from_pretrained"):
        AutoModelForSequenceClassification.from_pretrained(full_repo)
    assert not [r for r in hub_server.requests if f"{full_repo}/resolve/" in r and r.endswith(".safetensors")]

    for repo_id in (masks_repo, full_repo):
        loaded = AutoOptinModel.from_pretrained(repo_id)
        assert type(loaded) is type(model) and loaded.config.optin == model.config.optin
        assert torch.equal(output(loaded, batch("bert")), expected)
    local_masks = write_repo_folder(model, tmp_path / "local-masks", masks_repo, scores=pruner.scores)
    assert {p.name for p in local_masks.iterdir()} == MASKS_ONLY_FILES - {".gitattributes"}
    assert torch.equal(output(AutoOptinModel.from_pretrained(local_masks), batch("bert")), expected)

    hub_server.stop()  # from here on, only the HF cache can answer
    cached = AutoOptinModel.from_pretrained(masks_repo, local_files_only=True)
    assert torch.equal(output(cached, batch("bert")), expected)
    with pytest.raises(OSError, match="'test-user/never-pushed' .* is not in the local Hugging Face cache"):
        AutoOptinModel.from_pretrained("test-user/never-pushed", local_files_only=True)
    script = (
        "import sys; sys.path.insert(0, 'tests')\n"
        "from safetensors.torch import save_file\n"
        "from tiny import batch, output\n"
        "from optin_hf import AutoOptinModel\n"
        f"repos = {{'masks': {masks_repo!r}, 'full': {full_repo!r}}}\n"
        "outputs = {k: output(AutoOptinModel.from_pretrained(r), batch('bert')).contiguous() for k, r in repos.items()}\n"
        f"save_file(outputs, {str(tmp_path / 'offline.safetensors')!r})\n"
    )
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONPATH": str(ROOT)}  # read when huggingface_hub is imported
    done = subprocess.run([sys.executable, "-c", script], cwd=ROOT, env=env, capture_output=True, text=True, timeout=150)
    assert done.returncode == 0, done.stderr[-3000:]
    offline = load_file(str(tmp_path / "offline.safetensors"))
    assert torch.equal(offline["masks"], expected) and torch.equal(offline["full"], expected)


def test_masks_only_push_needs_a_base_model_on_the_hub(hub_server: FakeHub, tmp_path: Path) -> None:
    base_id, base_sha = push_base(tmp_path)
    model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")  # a local folder: no Hub id
    pruner = prune(model)
    with pytest.raises(ValueError, match=r"local folder.*base_model_name_or_path.*masks_only=False"):
        pruner.push_to_hub(model, "from-local")
    assert "test-user/from-local" not in hub_server.repos  # refused before anything was created

    pruner.push_to_hub(model, "from-local", masks_only=False)  # a full checkpoint needs no base model
    recorded = OptinConfig.from_pretrained(Path(hf_hub_download("test-user/from-local", "optin_config.json")).parent)
    assert recorded.base_model_name_or_path is None and recorded.base_model_revision is None
    assert ModelCard.load("test-user/from-local").data.base_model is None

    def pruned_naming(base: str) -> torch.nn.Module:
        model = AutoModelForSequenceClassification.from_pretrained(tmp_path / "base")
        OptinPruner(dataclasses.replace(pruner.config, base_model_name_or_path=base)).prune_model(model, calibration("bert"))
        return model

    with pytest.raises(ValueError, match="'test-user/no-such-base' is not a model repo on the Hub"):
        push_to_hub(pruned_naming("test-user/no-such-base"), "from-local")
    # Naming the base model allows a masks-only push, which removes the earlier full checkpoint's files.
    model = pruned_naming(base_id)
    push_to_hub(model, "from-local", scores=pruner.scores)
    assert set(list_repo_files("test-user/from-local")) == MASKS_ONLY_FILES
    loaded = AutoOptinModel.from_pretrained("test-user/from-local")
    assert torch.equal(output(loaded, batch("bert")), output(model, batch("bert")))
    # A loaded model carries its result: it is pushed again without a pruner, and loads the same.
    push_to_hub(loaded, "pushed-again", masks_only=False)
    again = AutoOptinModel.from_pretrained("test-user/pushed-again")
    assert torch.equal(output(again, batch("bert")), output(model, batch("bert")))
    recorded = OptinConfig.from_pretrained(Path(hf_hub_download("test-user/pushed-again", "optin_config.json")).parent)
    assert (recorded.base_model_name_or_path, recorded.base_model_revision) == (base_id, base_sha)


@pytest.mark.parametrize("arch, settings", [("vit", {"prune_tokens": True}), ("bert", {"seq_len": 12})])
def test_card_dense_macs_are_those_of_the_dense_model(arch: str, settings: dict) -> None:
    """A token-merged ViT's dense base runs every token in every layer: its MACs are not the pruned
    model's plus the removed units at the input length."""
    model = tiny_model(arch)
    dense = copy.deepcopy(model)
    pruner = OptinPruner(OptinConfig(mac_constraint=0.5, importance="random", reconstruct="none", **settings))
    pruner.prune_model(model, calibration(arch))
    seq_len = pruning_result(model).seq_len
    if arch == "vit":
        assert seq_len == 17 and pruner.masks.tokens_per_layer()[-1] < 17  # tokens really merge
    card = model_card(model, "me/x", masks_only=False, base_model=None, base_revision=None)
    [row] = [line for line in card.text.splitlines() if line.startswith("| encoder MACs")]
    _, label, dense_macs, pruned_macs, _ = row.split("|")
    assert ("(16x16 images)" if arch == "vit" else f"({seq_len:.1f} tokens)") in label  # the model's own terms
    assert dense_macs.strip() == f"{count_macs(dense, seq_len):.4g}"
    assert pruned_macs.split()[0] == f"{count_macs(model, seq_len):.4g}"


def test_hub_does_not_import_the_pruner() -> None:
    """The hub functions take the pruned model; the pruner may import the hub, never the reverse."""
    for path in (ROOT / "optin_hf" / "hub").glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = [*(node.module or "").split("."), *(alias.name for alias in node.names)]
            elif isinstance(node, ast.Import):
                names = [part for alias in node.names for part in alias.name.split(".")]
            else:
                continue
            assert "pruner" not in names, f"{path.name}:{node.lineno} imports the pruner"


def test_load_errors_say_what_is_wrong(hub_server: FakeHub, tmp_path: Path) -> None:
    base_id, old_sha = push_base(tmp_path)
    base_sha = upload_file(path_or_fileobj=b"# tiny\n", path_in_repo="README.md", repo_id=base_id).oid
    base_files = {"config.json": (tmp_path / "base" / "config.json").read_bytes()}

    def repo(name: str, files: dict[str, bytes]) -> str:
        folder = tmp_path / name
        folder.mkdir()
        for file_name, content in files.items():
            (folder / file_name).write_bytes(content)
        repo_id = create_repo(name).repo_id
        upload_folder(repo_id=repo_id, folder_path=folder)
        return repo_id

    def masks_file(masks: PruningMasks) -> bytes:
        masks.save(tmp_path / "masks.safetensors")
        return (tmp_path / "masks.safetensors").read_bytes()

    def optin_config(base: str, revision: str) -> bytes:
        return json.dumps(OptinConfig(base_model_name_or_path=base, base_model_revision=revision).to_dict()).encode()

    fitting = masks_file(PruningMasks.full(AutoConfig.from_pretrained(tmp_path / "base")))
    with pytest.raises(OSError, match="'test-user/unknown' is neither a local folder nor a model repo on the Hub"):
        AutoOptinModel.from_pretrained("test-user/unknown")
    with pytest.raises(FileNotFoundError, match=f"is spelled as a path, not a Hub repo id, and there is no such local "
                                                 f"folder: {tmp_path}/no/such/folder"):
        AutoOptinModel.from_pretrained(tmp_path / "no" / "such" / "folder")
    with pytest.raises(FileNotFoundError, match="has no optin_masks.safetensors: it is not an optin-hf checkpoint"):
        AutoOptinModel.from_pretrained(repo("card-only", {"README.md": b"# nothing here\n"}))
    with pytest.raises(FileNotFoundError, match="the slim weights are missing"):
        AutoOptinModel.from_pretrained(repo("no-weights", {**base_files, "optin_masks.safetensors": fitting}))
    corrupt = {"optin_config.json": optin_config(base_id, base_sha), "optin_masks.safetensors": b"not safetensors"}
    with pytest.raises(ValueError, match="not a valid safetensors pruning masks file"):
        AutoOptinModel.from_pretrained(repo("corrupt", corrupt))
    two_layers = {
        "optin_config.json": optin_config(base_id, base_sha),
        "optin_masks.safetensors": masks_file(PruningMasks(torch.ones(2, 4), torch.ones(2, 48))),
    }
    with pytest.raises(ValueError, match="masks of test-user/two-layers do not fit its base model 'test-user/tiny-bert'"):
        AutoOptinModel.from_pretrained(repo("two-layers", two_layers))
    no_safetensors_base = repo("no-safetensors-base", base_files)  # as if its weights were a pickled .bin
    on_it = {"optin_config.json": optin_config(no_safetensors_base, "main"), "optin_masks.safetensors": fitting}
    with pytest.raises(OSError, match="'test-user/no-safetensors-base' of test-user/on-it .* has no model.safetensors"):
        AutoOptinModel.from_pretrained(repo("on-it", on_it))

    rewritten = repo("rewritten", {"optin_config.json": optin_config(base_id, old_sha), "optin_masks.safetensors": fitting})
    del hub_server.repos[base_id].commits[old_sha]  # a force-push or squash dropped the recorded commit
    with pytest.raises(OSError, match=f"no revision '{old_sha}' any more.*Re-create the masks"):
        AutoOptinModel.from_pretrained(rewritten)
