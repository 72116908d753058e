"""Push a pruned model to the Hub in one commit, or write what a push would upload into a local folder."""

from __future__ import annotations

import dataclasses
import os
import tempfile
from pathlib import Path

from huggingface_hub import CommitInfo, HfApi
from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError
from torch import nn

from ..checkpoint import MAX_SHARD_SIZE, checkpoint_directory, write_checkpoint
from ..config import OptinConfig
from ..importance.scores import SCORES_NAME, ImportanceScores
from ..result import PruningResult, pruning_result
from .card import LIBRARY_NAME, CardMetrics, check_card_metrics, model_card
from .download import CHECKPOINT_FILES, is_hub_id

# Files a push owns: those of the other kind (or stale shards) are deleted, so a repo never mixes a masks-only
# optin_config.json with the weights of an earlier full push.
PUSHED_FILES = [*CHECKPOINT_FILES, SCORES_NAME]


def _api(token: str | bool | None) -> HfApi:
    # Built per call, so the endpoint and token are read now, not when optin_hf was imported.
    from .. import __version__

    return HfApi(token=token, library_name=LIBRARY_NAME, library_version=__version__)


def _hub_base(config: OptinConfig, api: HfApi, masks_only: bool) -> tuple[str | None, str | None]:
    """The base model's Hub id and commit sha; (None, None) for a full checkpoint of a model that is not on the Hub.

    The base is the one the pruned model records: set in OptinConfig, or the name from_pretrained gave the dense
    model (a Hub id or a local folder) and the commit it was read at.
    """
    name = config.base_model_name_or_path
    if name is None or Path(name).exists() or not is_hub_id(name):
        if masks_only:
            where = f"the local folder {name!r}" if name else "no Hub repo (it was built from a config)"
            raise ValueError(
                f"The base model came from {where}, so a masks-only repo cannot name a base model others can "
                "download. Pass OptinConfig(base_model_name_or_path='org/name', base_model_revision=...) naming the "
                "Hub repo it came from, or push the full slim checkpoint with masks_only=False."
            )
        return None, None
    revision = config.base_model_revision
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


def _pushed_result(
    model: nn.Module, api: HfApi, masks_only: bool, metrics: CardMetrics | None, speedup: float | None
) -> PruningResult:
    """The model's result, its config naming the base model as the pushed optin_config.json records it.

    Everything that can refuse a push is checked here, before anything is created on the Hub.
    """
    result = pruning_result(model)
    check_card_metrics(metrics, speedup)
    base_model, base_revision = _hub_base(result.config, api, masks_only)
    config = dataclasses.replace(
        result.config,
        base_model_name_or_path=base_model,
        base_model_revision=base_revision,
        base_model_class=type(model).__name__,
    )
    return dataclasses.replace(result, config=config)


def _fill_repo_folder(
    folder: Path,
    model: nn.Module,
    result: PruningResult,
    repo_id: str,
    *,
    scores: ImportanceScores | None,
    masks_only: bool,
    metrics: CardMetrics | None,
    speedup: float | None,
    max_shard_size: int | str,
) -> None:
    write_checkpoint(folder, model, result, scores=scores, masks_only=masks_only, max_shard_size=max_shard_size)
    card = model_card(
        model,
        repo_id,
        masks_only=masks_only,
        base_model=result.config.base_model_name_or_path,
        base_revision=result.config.base_model_revision,
        metrics=metrics,
        speedup=speedup,
    )
    card.save(folder / "README.md")


def write_repo_folder(
    model: nn.Module,
    folder: str | os.PathLike,
    repo_id: str,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = True,
    token: str | None = None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> Path:
    """Write what `push_to_hub` would upload to `repo_id` into a local folder, to inspect or upload later.

    The folder is replaced as `save_pruned` replaces one: a non-empty folder that is not an optin-hf
    checkpoint is refused unless `overwrite=True`, and files optin-hf did not write are kept.
    """
    result = _pushed_result(model, _api(token), masks_only, metrics, speedup)
    with checkpoint_directory(folder, overwrite) as tmp:
        _fill_repo_folder(
            tmp, model, result, repo_id, scores=scores, masks_only=masks_only, metrics=metrics, speedup=speedup,
            max_shard_size=max_shard_size,
        )
    return Path(folder)


def push_to_hub(
    model: nn.Module,
    repo_id: str,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = True,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str | None = None,
    metrics: CardMetrics | None = None,
    speedup: float | None = None,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> CommitInfo:
    """Push the pruned `model` (the result it carries, and `scores` if given) to `repo_id` (created if
    needed) in one commit; returns the commit.

    masks_only=True uploads a masks-only repo naming the base model at its exact commit; it refuses a base model
    that is not on the Hub. masks_only=False uploads the full slim checkpoint, its weights sharded above
    `max_shard_size`. `metrics` (see `CardMetrics`) and `speedup` (dense latency / slim latency, as you
    measured it) go into the model card.
    """
    api = _api(token)
    result = _pushed_result(model, api, masks_only, metrics, speedup)  # a refused push leaves no repo behind
    repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with the namespace, for the card
    with tempfile.TemporaryDirectory(prefix="optin-push-") as tmp:
        _fill_repo_folder(
            Path(tmp), model, result, repo_id, scores=scores, masks_only=masks_only, metrics=metrics,
            speedup=speedup, max_shard_size=max_shard_size,
        )
        kind = "masks" if masks_only else "slim checkpoint"
        return api.upload_folder(
            repo_id=repo_id,
            folder_path=tmp,
            commit_message=commit_message or f"Upload OPTIN-pruned {kind} ({result.config.mac_constraint:.0%} of MACs)",
            delete_patterns=PUSHED_FILES,
        )
