"""Fetch dense models, optin-hf repos and the base models of masks-only repos through huggingface_hub (its cache,
HF_ENDPOINT, HF_HUB_OFFLINE and tokens work as usual), with errors that name what was asked for and why it failed.

Names someone else chose (a Space visitor's, a Hub repo's base model) must be Hub ids (`check_hub_id`), decided on
the string alone."""

from __future__ import annotations

from pathlib import Path

from huggingface_hub import HfApi, constants, snapshot_download
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
# What AutoTokenizer / AutoImageProcessor read from a folder (vocabularies, sentencepiece models, configs): a dense
# model's snapshot holds these and its weights, and nothing a loader could unpickle or run.
PROCESSOR_FILES = [
    "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
    "vocab.txt", "vocab.json", "merges.txt", "*.model", "preprocessor_config.json", "processor_config.json",
]
MODEL_FILES = BASE_MODEL_FILES + PROCESSOR_FILES


def is_hub_id(name: object) -> bool:
    """Whether `name` is a Hub repo id ("name" or "org/name"). No path spelling is one: ./x, ../x, /x, ~/x, a/b/c,
    a\\b and C:\\x all fail, so a refused id never reaches the disk."""
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def check_hub_id(name: str, what: str, why: str) -> str:
    """`name` if it is a Hub repo id, else a ValueError "{what} is not a Hub repo id (...): {why}".

    For names someone else chose (a Space visitor, a repo on the Hub): decided on the string alone, before anything
    on disk is looked at, so such a name can neither read this machine's files nor learn whether a path exists.
    """
    if not is_hub_id(name):
        raise ValueError(f"{what} is not a Hub repo id (name or org/name): {why}")
    return name


def _looks_like_path(name: str) -> bool:
    """Spellings only a path has: a Hub id never starts with . or ~, is never absolute, and has at most one /."""
    return name.startswith((".", "~")) or Path(name).is_absolute() or name.count("/") > 1 or "\\" in name


def _no_such_folder(name: str) -> str:
    folder = f"no such local folder: {Path(name).absolute()}"
    return folder + (" (~ is not expanded here: give the full path)" if name.startswith("~") else "")


def _download(
    repo_id: str,
    revision: str | None,
    patterns: list[str],
    *,
    token: str | bool | None,
    local_files_only: bool,
    what: str,
    allow_local: bool,
    revision_gone: str = "",
) -> Path:
    """snapshot_download, with errors that name `what` was fetched (e.g. "The checkpoint 'org/x'") and why it failed.

    `allow_local`: `repo_id` is the user's own word and may have been meant as a folder (the caller found none), so a
    path spelling is named as a missing folder, not sent to the Hub, and a Hub failure names the folder that is
    missing when its parent exists (`models/bert` with a `models/` here). Without it nothing local is mentioned.
    """
    if allow_local and _looks_like_path(repo_id):
        raise FileNotFoundError(
            f"{what} is spelled as a path, not a Hub repo id, and there is {_no_such_folder(repo_id)}."
        )
    local = "a local folder"
    if allow_local and Path(repo_id).parent != Path(".") and Path(repo_id).parent.is_dir():
        local += f" ({_no_such_folder(repo_id)})"
    try:
        return Path(
            snapshot_download(
                repo_id, revision=revision, allow_patterns=patterns, token=token, local_files_only=local_files_only
            )
        )
    except HFValidationError as err:
        raise OSError(f"{what} is neither {local} nor a valid Hub repo id (name or org/name).") from err
    except RepositoryNotFoundError as err:
        raise OSError(
            f"{what} is neither {local} nor a model repo on the Hub; if it is private or gated, pass token=... ."
        ) from err
    except RevisionNotFoundError as err:
        raise OSError(f"{what} has no revision {revision!r}{revision_gone}.") from err
    except LocalEntryNotFoundError as err:
        if local_files_only or constants.HF_HUB_OFFLINE:
            why = "downloads are off (HF_HUB_OFFLINE=1 or local_files_only=True)"
        else:
            why = f"the Hub cannot be reached ({type(err.__cause__ or err).__name__})"
        raise OSError(
            f"{what} is neither {local} nor reachable on the Hub: {why}, and revision {revision or 'main'} is not in "
            "the local Hugging Face cache."
        ) from err


def hub_commit(repo_id: str, *, token: str | bool | None, what: str, repo_type: str = "model") -> str:
    """The commit the Hub itself serves for `repo_id` to `token`, asked live.

    huggingface_hub answers a refused request (401/404) from its cache when it holds the repo, so a private repo
    fetched once with another token would be served to anyone; the Hub's own answer decides instead.
    """
    try:
        return HfApi(token=token).repo_info(repo_id, repo_type=repo_type).sha
    except RepositoryNotFoundError as err:  # also GatedRepoError; 401 and 404 alike, as the Hub hides private repos
        who = "the token given" if isinstance(token, str) else "an anonymous request"
        raise OSError(
            f"{what} was not found on the Hub, or it is private or gated and {who} cannot read it "
            f"(HTTP {err.response.status_code})."
        ) from err
    except Exception as err:  # the HTTP transport's own connection errors (httpx or httpx2) are no OSError
        raise OSError(
            f"{what} cannot be checked on the Hub ({type(err).__name__}), and it is never read from this machine's "
            "cache without that check."
        ) from err


def download_model(
    name: str, patterns: list[str] = MODEL_FILES, *, hub_only: bool = False, token: str | bool | None = None
) -> Path:
    """The folder to load a dense model (or, with PROCESSOR_FILES, a processor) from: `name` itself when it is a local
    folder, else the snapshot of its Hub repo (config, safetensors weights and processor files, never pickles).

    The one place model names are resolved, so every entry point (CLI, recipes, Space) refuses a bad one alike: a
    path spelling that is no folder is named as a missing folder, a Hub id that cannot be fetched as such.
    `hub_only`: `name` was typed by someone else (a Space visitor). It must be a Hub id, no folder of this machine is
    looked at, and access is the Hub's live answer for `token` (token=False: none, and HF_TOKEN is not sent),
    never this machine's cache.
    """
    what = f"The model {name!r}"
    if hub_only:
        check_hub_id(name, what, "only models on the Hub load here, never a path on this machine.")
        revision = hub_commit(name, token=token, what=what)
        return _download(name, revision, patterns, token=token, local_files_only=False, what=what, allow_local=False)
    if Path(name).is_dir():
        return Path(name)
    return _download(name, None, patterns, token=token, local_files_only=False, what=what, allow_local=True)


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
        allow_local=True,
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
            check_hub_id(
                name,
                f"{source} names the base model {name!r}, which",
                "a masks-only repo from the Hub may only name a base model on the Hub, never a path on this machine. "
                "If you trust that folder, pass it yourself: AutoOptinModel.from_pretrained(..., base_model=PATH).",
            )
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
            allow_local=allow_local,
            revision_gone=gone,
        )
    config = load_supported_config(folder, what)
    if not ((folder / WEIGHTS_NAME).is_file() or (folder / WEIGHTS_INDEX_NAME).is_file()):
        raise OSError(
            f"{what} (revision {revision}) has no {WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}: optin-hf loads safetensors "
            "weights only, never pickled .bin files."
        )
    return folder, config
