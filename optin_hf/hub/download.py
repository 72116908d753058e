"""Fetch optin-hf repos and the base models of masks-only repos through huggingface_hub (its cache, HF_ENDPOINT,
HF_HUB_OFFLINE and tokens work as usual)."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import snapshot_download
from huggingface_hub.errors import HFValidationError, LocalEntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import validate_repo_id
from transformers import PretrainedConfig

from ..checkpoint import MODEL_CONFIG_NAME, WEIGHTS_INDEX_NAME, WEIGHTS_NAME, load_supported_config
from ..config import CONFIG_NAME
from ..masks import MASKS_NAME
from ..reconstruct import RECONSTRUCTION_NAME

SHARD_PATTERN = "model-*-of-*.safetensors"
# What AutoOptinModel reads from an optin-hf repo, and what it needs of a masks-only repo's base model.
CHECKPOINT_FILES = [
    CONFIG_NAME, MASKS_NAME, RECONSTRUCTION_NAME, MODEL_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SHARD_PATTERN
]
BASE_MODEL_FILES = [MODEL_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, SHARD_PATTERN]


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
    name: str,
    revision: str | None,
    source: str,
    *,
    allow_local: bool,
    token: str | bool | None = None,
    local_files_only: bool = False,
) -> tuple[Path, PretrainedConfig]:
    """The folder of a masks-only repo's base model (config and safetensors weights) at its recorded commit, and its
    config, checked to be a supported model before any weight is looked at.

    A local folder is read only with `allow_local` (the user named it); otherwise `name` must be a Hub id, so a repo
    downloaded from the Hub cannot make the loader read files of this machine.
    """
    what = f"The base model {name!r} of {source}"
    if allow_local and Path(name).is_dir():
        folder = Path(name)
    else:
        if not allow_local:
            try:
                validate_repo_id(name)
            except HFValidationError as err:
                raise ValueError(
                    f"{source} names the base model {name!r}, which is not a Hub repo id: a masks-only repo from the "
                    "Hub may only name a base model on the Hub, never a path on this machine. If you trust that "
                    "folder, pass it yourself: AutoOptinModel.from_pretrained(..., base_model=PATH)."
                ) from err
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
    config = load_supported_config(folder, what)
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
        raise OSError(
            f"{what} (revision {revision}) has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}: optin-hf loads safetensors "
            "weights only, never pickled .bin files."
        )
    return folder, config
