"""Share pruned models on the Hub and fetch them back.

Two kinds of repo. A masks-only repo (the default, like a PEFT adapter) holds `optin_config.json`, naming the base
model by Hub id and exact commit, the masks (and scores) and a model card: a few kB, and the loader rebuilds the
slim model from the base. A full repo adds the slim weights and config.json and loads without the base. All Hub
traffic goes through huggingface_hub, so HF_ENDPOINT, HF_HUB_OFFLINE, tokens and the HF cache work as usual.
"""

from __future__ import annotations

import dataclasses
import json
import os
import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, TypedDict

from huggingface_hub import CommitInfo, EvalResult, HfApi, ModelCard, ModelCardData, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.utils import validate_repo_id
from torch import nn

from .arch import get_adapter
from .checkpoint import MODEL_CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, atomic_directory, write_checkpoint
from .config import CONFIG_NAME, OptinConfig
from .importance import SCORES_NAME
from .macs import count_macs, head_macs, neuron_macs
from .masks import MASKS_NAME
from .reconstruct import RECONSTRUCTION_NAME

if TYPE_CHECKING:
    from .pruner import OptinPruner

LIBRARY_NAME = "optin-hf"
SHARD_PATTERN = "model-*-of-*.safetensors"
# What AutoOptinModel reads from an optin-hf repo, and what it needs of a masks-only repo's base model.
CHECKPOINT_FILES = [
    CONFIG_NAME, MASKS_NAME, RECONSTRUCTION_NAME, MODEL_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SHARD_PATTERN
]
BASE_MODEL_FILES = [MODEL_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SHARD_PATTERN]
# Files a push owns: those of the other kind (or stale shards) are deleted, so a repo never mixes a masks-only
# optin_config.json with the weights of an earlier full push.
PUSHED_FILES = [*CHECKPOINT_FILES, SCORES_NAME]


class CardMetrics(TypedDict, total=False):
    """Dense vs pruned scores on one evaluation set, for the model card (`model-index` and a table).

    Required: `task_type` (e.g. "text-classification"), `dataset_type` (the dataset's Hub id) and `pruned`
    (metric name -> value of the pruned model); `dense` holds the base model's values under the same names.
    """

    task_type: str
    dataset_type: str
    dataset_name: str
    dataset_config: str
    dataset_split: str
    pruned: dict[str, float]
    dense: dict[str, float]


def _api(token: str | bool | None) -> HfApi:
    # Built per call, so the endpoint and token are read now, not when optin_hf was imported; __version__ is read
    # late because optin_hf/__init__.py imports this module before defining it.
    from . import __version__

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _is_repo_id(name: str) -> bool:
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def _base_model(pruner: OptinPruner, model: nn.Module, api: HfApi, masks_only: bool) -> tuple[str | None, str | None]:
    """The base model's Hub id and commit sha; (None, None) for a full checkpoint of a model that is not on the Hub.

    `OptinConfig.base_model_*` win over `model.name_or_path`, which from_pretrained sets to the id or folder it read.
    """
    name = pruner.config.base_model_name_or_path
    if name is None:
        detected = getattr(model, "name_or_path", "") or ""
        name = detected if detected and not Path(detected).exists() and _is_repo_id(detected) else None
        if name is None and masks_only:
            where = f"the local folder {detected!r}" if detected else "no Hub repo (it was built from a config)"
            raise ValueError(
                f"The base model came from {where}, so a masks-only repo cannot name a base model others can "
                "download. Pass OptinConfig(base_model_name_or_path='org/name', base_model_revision=...) naming the "
                "Hub repo it came from, or push the full slim checkpoint with masks_only=False."
            )
    if name is None:
        return None, None
    revision = pruner.config.base_model_revision
    try:
        sha = api.model_info(name, revision=revision).sha
    except RepositoryNotFoundError as err:
        raise ValueError(
            f"The base model {name!r} is not a model repo on the Hub (or it is private and no token was given); set "
            "OptinConfig(base_model_name_or_path=...) to the Hub id it came from."
        ) from err
    except RevisionNotFoundError as err:
        raise ValueError(f"The base model {name!r} has no revision {revision!r} on the Hub.") from err
    return name, sha


def _macs(pruner: OptinPruner, model: nn.Module) -> tuple[float, float] | None:
    """(dense, pruned) encoder MACs at the pruner's sequence length; None when that length is unknown."""
    if pruner.seq_len is None:
        return None
    seq_len, config, masks = pruner.seq_len, model.config, pruner.masks
    head_dim = get_adapter(config).head_dim(config)
    pruned = count_macs(model, seq_len)
    removed_heads = int((~masks.head_mask).sum())
    removed_neurons = int((~masks.neuron_mask).sum())
    dense = pruned + removed_heads * head_macs(seq_len, config.hidden_size, head_dim)
    dense += removed_neurons * neuron_macs(seq_len, config.hidden_size)
    return dense, pruned


def _check_metrics(metrics: CardMetrics | None) -> None:
    if metrics is None:
        return
    missing = {"task_type", "dataset_type", "pruned"} - set(metrics)
    if missing:
        raise ValueError(f"metrics lacks {sorted(missing)}; see optin_hf.hub.CardMetrics for its keys.")


def _eval_results(metrics: CardMetrics) -> list[EvalResult]:
    """The pruned scores under their metric type; the dense ones typed `dense_<metric>`, so a leaderboard reading
    this card never credits the pruned model with the base model's score."""
    dataset = dict(
        task_type=metrics["task_type"],
        dataset_type=metrics["dataset_type"],
        dataset_name=metrics.get("dataset_name", metrics["dataset_type"]),
        dataset_config=metrics.get("dataset_config"),
        dataset_split=metrics.get("dataset_split"),
    )
    results = [
        EvalResult(**dataset, metric_type=name, metric_name=f"{name} (pruned)", metric_value=value)
        for name, value in metrics["pruned"].items()
    ]
    results += [
        EvalResult(**dataset, metric_type=f"dense_{name}", metric_name=f"{name} (dense base model)", metric_value=value)
        for name, value in metrics.get("dense", {}).items()
    ]
    return results


def model_card(
    pruner: OptinPruner,
    model: nn.Module,
    repo_id: str,
    *,
    masks_only: bool,
    base_model: str | None,
    base_revision: str | None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
) -> ModelCard:
    """The README.md of a pushed repo: what was pruned and how much, the scores, and how to load it."""
    _check_metrics(metrics)
    config, masks = pruner.config, pruner.masks
    model_name = repo_id.split("/")[-1]
    data = ModelCardData(
        base_model=base_model,
        library_name=LIBRARY_NAME,
        tags=["optin", "pruning", model.config.model_type],
        model_name=model_name,
        eval_results=_eval_results(metrics) if metrics else None,
    )
    base = f"`{base_model}` at commit `{base_revision}`" if base_model else "A model that is not on the Hub"
    kind = "only the pruning masks" if masks_only else "the slim weights"
    table = [
        "| | dense | pruned |",
        "|---|---|---|",
        f"| attention heads | {masks.head_mask.numel()} | {int(masks.head_mask.sum())} |",
        f"| FFN neurons | {masks.neuron_mask.numel()} | {int(masks.neuron_mask.sum())} |",
    ]
    macs = _macs(pruner, model)
    if macs is not None:
        dense, pruned = macs
        share = f"{pruned:.4g} ({pruned / dense:.1%})"
        table.append(f"| encoder MACs per example ({pruner.seq_len:.1f} tokens) | {dense:.4g} | {share} |")
    for name, value in (metrics or {}).get("pruned", {}).items():
        table.append(f"| {name} on {metrics['dataset_type']} | {metrics.get('dense', {}).get(name, '')} | {value} |")
    if speedup is not None:
        table.append(f"| measured speedup | 1.00x | {speedup:.2f}x |")
    per_layer = ["| layer | heads | FFN neurons |", "|---|---|---|"]
    per_layer += [
        f"| {i} | {h} / {masks.head_mask.shape[1]} | {n} / {masks.neuron_mask.shape[1]} |"
        for i, (h, n) in enumerate(zip(masks.heads_per_layer(), masks.neurons_per_layer()))
    ]
    if masks_only:
        how = f"The loader downloads `{base_model}` at commit `{base_revision}` and removes the pruned structures."
    else:
        how = (
            "Plain `transformers` refuses this repo with a message pointing to optin-hf: its layers have per-layer "
            "sizes that only optin-hf builds."
        )
    if config.reconstruct != "none" and pruner.reconstruction is not None:
        size = sum(t.numel() * t.element_size() for t in pruner.reconstruction.tensors.values())
        how += (
            f" After slimming, each sublayer's output projection was refit by ridge least squares on "
            f"{config.reconstruct_samples} calibration examples (`reconstruct=\"{config.reconstruct}\"`), so the kept "
            "weights differ from the base model's"
            + (f"; this repo carries them in `{RECONSTRUCTION_NAME}` ({size / 1e6:.2f} MB)." if masks_only else ".")
        )
    if base_model:
        how += f" The tokenizer (or image processor) is the base model's: load it from `{base_model}`."
    settings = {k: v for k, v in config.to_dict().items() if not k.startswith("base_model") and v not in ({}, None)}
    body = [
        f"# {model_name}",
        "",
        f"{base}, pruned with [OPTIN](https://arxiv.org/abs/2403.17921) (ICLR 2024): one-shot, retraining-free "
        f"structured pruning of attention heads and FFN neurons (importance `{config.importance}`) down to at most "
        f"{config.mac_constraint:.0%} of the encoder MACs. This repo holds {kind}.",
        "",
        *table,
        "",
        "Kept per layer:",
        "",
        *per_layer,
        "",
        "## How to load",
        "",
        "```python",
        "from optin_hf import AutoOptinModel  # pip install optin-hf",
        "",
        f'model = AutoOptinModel.from_pretrained("{repo_id}")',
        "```",
        "",
        how,
        "",
        "## Pruning settings",
        "",
        "```json",
        json.dumps(settings, indent=2, sort_keys=True),
        "```",
        "",
    ]
    return ModelCard(f"---\n{data.to_yaml()}\n---\n" + "\n".join(body))


def _resolved_config(
    pruner: OptinPruner, model: nn.Module, api: HfApi, masks_only: bool, metrics: CardMetrics | None
) -> OptinConfig:
    """The pruner's settings plus the base model it pruned, as the pushed optin_config.json records them.

    Everything that can refuse a push is checked here, before anything is created on the Hub.
    """
    pruner.check_pruned(model)
    _check_metrics(metrics)
    base_model, base_revision = _base_model(pruner, model, api, masks_only)
    return dataclasses.replace(
        pruner.config,
        base_model_name_or_path=base_model,
        base_model_revision=base_revision,
        base_model_class=type(model).__name__,
    )


def _fill_repo_folder(
    folder: Path,
    pruner: OptinPruner,
    model: nn.Module,
    config: OptinConfig,
    repo_id: str,
    *,
    masks_only: bool,
    metrics: CardMetrics | None,
    speedup: float | None,
    max_shard_size: int | str | None,
) -> None:
    slim = None if masks_only else model
    write_checkpoint(
        folder, slim, config, pruner.masks, pruner.scores, max_shard_size or pruner.max_shard_size, pruner.reconstruction
    )
    card = model_card(
        pruner,
        model,
        repo_id,
        masks_only=masks_only,
        base_model=config.base_model_name_or_path,
        base_revision=config.base_model_revision,
        metrics=metrics,
        speedup=speedup,
    )
    card.save(folder / "README.md")


def write_repo_folder(
    pruner: OptinPruner,
    model: nn.Module,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    masks_only: bool = True,
    token: str | None = None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
    max_shard_size: int | str | None = None,
) -> Path:
    """Write what `push_to_hub` would upload to `repo_id` into a local folder, to inspect or upload later."""
    config = _resolved_config(pruner, model, _api(token), masks_only, metrics)
    with atomic_directory(folder) as tmp:
        _fill_repo_folder(
            tmp, pruner, model, config, repo_id, masks_only=masks_only, metrics=metrics, speedup=speedup,
            max_shard_size=max_shard_size,
        )
    return Path(folder)


def push_to_hub(
    pruner: OptinPruner,
    model: nn.Module,
    repo_id: str,
    *,
    masks_only: bool = True,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
    max_shard_size: int | str | None = None,
) -> CommitInfo:
    """Push the pruned `model` to `repo_id` (created if needed) in one commit; returns the commit.

    masks_only=True uploads a masks-only repo naming the base model at its exact commit; it refuses a base model
    that is not on the Hub. masks_only=False uploads the full slim checkpoint, its weights sharded above
    `max_shard_size`. `metrics` (see `CardMetrics`) and `speedup` (dense latency / slim latency, as you
    measured it) go into the model card.
    """
    api = _api(token)
    config = _resolved_config(pruner, model, api, masks_only, metrics)  # a refused push leaves no repo behind
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with the namespace, for the card
    with tempfile.TemporaryDirectory(prefix="optin-push-") as tmp:
        _fill_repo_folder(
            Path(tmp), pruner, model, config, repo_id, masks_only=masks_only, metrics=metrics, speedup=speedup,
            max_shard_size=max_shard_size,
        )
        kind = "masks" if masks_only else "slim checkpoint"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or f"Upload OPTIN-pruned {kind} ({pruner.config.mac_constraint:.0%} of MACs)",
            delete_patterns=PUSHED_FILES,
        )


def _download(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    *,
    token: str | bool | None,
    local_files_only: bool,
    what: str,
    revision_gone: str = "",
) -> Path:
    """snapshot_download, with errors that name `what` was fetched (e.g. "The checkpoint 'org/x'") and why it failed."""
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, token=token, local_files_only=local_files_only
            )
        )
    except HFValidationError as err:
        raise OSError(f"{what} is neither a local folder nor a valid Hub repo id.") from err
    except RepositoryNotFoundError as err:
        raise OSError(
            f"{what} is neither a local folder nor a model repo on the Hub; if it is private or gated, pass token=... ."
        ) from err
    except RevisionNotFoundError as err:
        raise OSError(f"{what} has no revision {revision!r}{revision_gone}.") from err
    except LocalEntryNotFoundError as err:
        raise OSError(
            f"{what} (revision {revision or 'main'}) is not in the local Hugging Face cache and cannot be downloaded "
            f"(HF_HUB_OFFLINE=1, local_files_only=True or the Hub is unreachable): {err}"
        ) from err


def download_checkpoint(
    repo_id: str, revision: str | None = None, *, token: str | bool | None = None, local_files_only: bool = False
) -> Path:
    """The cached snapshot of an optin-hf repo: the files AutoOptinModel reads, not the card or the scores."""
    return _download(
        repo_id,
        revision,
        CHECKPOINT_FILES,
        token=token,
        local_files_only=local_files_only,
        what=f"The checkpoint {repo_id!r}",
    )


def download_base_model(
    name: str, revision: str | None, source: str, *, token: str | bool | None = None, local_files_only: bool = False
) -> Path:
    """The folder of a masks-only repo's base model (config and safetensors weights) at its recorded commit."""
    what = f"The base model {name!r} of {source}"
    if Path(name).is_dir():
        folder = Path(name)
    else:
        gone = (
            f" any more (recorded in {CONFIG_NAME}; the base repo's history was rewritten). Re-create the masks from "
            "the current base model, or share the full slim checkpoint (masks_only=False), which needs no base model"
        )
        folder = _download(
            name,
            revision,
            BASE_MODEL_FILES,
            token=token,
            local_files_only=local_files_only,
            what=what,
            revision_gone=gone,
        )
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
        raise OSError(
            f"{what} (revision {revision}) has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}: optin-hf loads safetensors "
            "weights only, never pickled .bin files."
        )
    return folder
