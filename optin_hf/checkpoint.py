"""Saving a pruned model: safe, atomic checkpoint folders; the slim model's config.json; strict safetensors weight loading.

How a folder is replaced (`atomic_directory`). The target is first made absolute with its symlinks resolved
(`save_path`), so `.` is the current folder by its name and a symlinked NAME is the folder it points to (the link
is kept); the root of the file system, which cannot be renamed, is refused. The new files go into a hidden sibling
`.NAME.tmp-*`, beside NAME in its parent, never inside it. Then NAME is renamed to `.NAME.old-*`, the new folder to
NAME, and the old one deleted. A kill before the first rename leaves NAME untouched; after the second, NAME is the
new folder. Between the two renames NAME is missing, and the complete old folder is the only `.NAME.old-*`: the
next save or `AutoOptinModel.from_pretrained` of NAME (`restore_interrupted_save`) renames it back. So whenever a
save dies, NAME is, or on the next save or load becomes, the complete old or the complete new folder. The next save
deletes what killed saves left beside NAME (`.NAME.tmp-*`, stale `.NAME.old-*`). A save into the current folder (or
a folder holding it) moves this process into the new folder; a shell sitting in it still shows the old, deleted one
until it runs `cd .`.

Concurrent saves (`save_lock`). A save holds an exclusive lock (flock) on `.NAME.lock` beside NAME from before it
restores or deletes any leftover until its new folder is in place, and a load that must restore an interrupted save
takes it too. A second save into NAME, from this process or another, waits for the first (a warning says so) and
then replaces it, keeping the user's files as every save does; after `LOCK_TIMEOUT_S` of waiting it gives up with a
`TimeoutError` naming the folder. So no save ever deletes or restores what a live save is writing. The operating
system drops the lock of a killed process; the lock file is deleted when the save ends (one left by a kill is
reused).

What a checkpoint save may replace (`checkpoint_directory`). optin-hf owns the files it writes into a checkpoint:
`optin_*` (its config, masks, scores, refit parameters, `optin_report.*`), `config.json`, the weights
(`model.safetensors`, its index and `model-*-of-*.safetensors` shards) and the model card `README.md`
(`OWNED_FILES`). Replacing an earlier checkpoint (a folder with `optin_masks.safetensors`) drops the owned files
and keeps every other entry (a tokenizer, notes, `.git`), hard-linked into the new folder. A non-empty folder that
is not a checkpoint is refused unless `overwrite=True`, which saves into it by the same rule. A save that the disk
cannot hold (no space, quota, file size limit) is undone and reported as one `OSError` naming the folder
(`_write_errors`).

A masks-only checkpoint over a base model in a local folder records a fingerprint of the base's weights
(`weights_fingerprint`), which the load checks: a Hub base is pinned by its commit instead.
"""

from __future__ import annotations

import dataclasses
import errno
import fnmatch
import hashlib
import json
import os
import re
import shutil
import time
import uuid
import warnings
from contextlib import contextmanager, suppress
from pathlib import Path
from typing import Iterator

import torch
from huggingface_hub import save_torch_state_dict
from huggingface_hub.errors import StrictDataclassError
from safetensors import SafetensorError, safe_open
from torch import nn
from transformers import AutoConfig, PretrainedConfig

from .arch import ADAPTERS, get_adapter
from .importance.scores import SCORES_NAME, ImportanceScores
from .masks import MASKS_NAME, load_safetensors
from .reconstruct import RECONSTRUCTION_NAME, save_reconstruction
from .result import PruningResult, pruning_result

MODEL_CONFIG_NAME = "config.json"
WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
# What a save replaces in an existing folder; any other entry there is the user's and is kept.
OWNED_FILES = ("optin_*", MODEL_CONFIG_NAME, WEIGHTS_NAME, WEIGHTS_INDEX_NAME, "model-*-of-*.safetensors", "README.md")
MAX_SHARD_SIZE = "5GB"
LOCK_TIMEOUT_S = 600.0  # how long a save waits for another save into the same folder
# transformers reads `transformers_weights` in config.json as the name of the weights file and, before it builds the
# model or downloads a weight, refuses a name that is not a safetensors file, quoting it. Without this, plain
# `from_pretrained` would build the dense shapes and stop on a wall of size-mismatch reports.
NOT_FOR_TRANSFORMERS = (
    "this is an optin-hf pruned checkpoint with per-layer head and neuron counts that transformers cannot build; "
    "load it with optin_hf.AutoOptinModel.from_pretrained(...) (pip install optin-hf)"
)

try:
    import fcntl
except ImportError:  # Windows
    fcntl = None
    import msvcrt


def save_path(target: str | os.PathLike) -> Path:
    """The folder a save into `target` replaces: absolute, with `.`, `..` and symlinks resolved, so that its temp
    folders go beside it and a symlink is followed, not replaced. The root of the file system cannot be replaced."""
    try:
        path = Path(target).resolve()
    except RuntimeError as err:  # Python < 3.13 reports a symlink loop as RuntimeError, 3.13 as OSError
        raise OSError(f"Cannot save into {target}: its path runs into a symlink loop ({err}). Remove the loop, or choose another folder.") from err
    if path.parent == path:
        raise ValueError(
            f"{target} is the root of the file system: a save replaces its folder by renaming a new one into place, "
            "which the root cannot be. Save into a folder below it."
        )
    return path


def _leftovers(target: Path, kind: str) -> list[Path]:
    """The `.NAME.tmp-*` or `.NAME.old-*` folders beside `target`."""
    prefix = f".{target.name}.{kind}-"
    return sorted(p for p in target.parent.iterdir() if p.name.startswith(prefix))


def _try_lock(fd: int) -> bool:
    """Take an exclusive lock on the open file `fd` without waiting; the OS drops it when the process dies."""
    try:
        if fcntl is not None:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        else:
            msvcrt.locking(fd, msvcrt.LK_NBLCK, 1)
    except OSError as err:
        if err.errno in (errno.EAGAIN, errno.EACCES, errno.EDEADLK):  # held by another save
            return False
        raise
    return True


@contextmanager
def save_lock(target: Path) -> Iterator[None]:
    """Hold `.NAME.lock` beside the folder `target` (a `save_path`) exclusively, waiting up to `LOCK_TIMEOUT_S`
    for another save to end (module docstring)."""
    lock = target.parent / f".{target.name}.lock"
    deadline, warned = time.monotonic() + LOCK_TIMEOUT_S, False
    while True:
        fd = os.open(lock, os.O_RDWR | os.O_CREAT, 0o644)
        if _try_lock(fd):
            # The holder deletes the lock file before it lets go: a lock on a file no longer at `lock` is stale.
            with suppress(FileNotFoundError):
                if os.path.samestat(os.fstat(fd), os.stat(lock)):
                    break
        os.close(fd)
        if time.monotonic() > deadline:
            raise TimeoutError(
                f"Another save into {target} has held {lock} for over {LOCK_TIMEOUT_S:.0f} s: let it finish (or stop "
                "it) and save again. Saves into one folder run one after the other."
            )
        if not warned:
            warnings.warn(f"Waiting for another save into {target} to finish ({lock} is held).", stacklevel=3)
            warned = True
        time.sleep(0.05)
    try:
        yield
    finally:
        if fcntl is not None:
            with suppress(FileNotFoundError):
                os.unlink(lock)  # while still held (see above)
            os.close(fd)
        else:  # Windows deletes no open file: a waiter that has it open keeps it, and locks it next
            os.close(fd)
            with suppress(OSError):
                os.unlink(lock)


def _restore(target: Path) -> None:
    """Rename back the old folder of a save killed between its two renames; the caller holds `save_lock`."""
    if target.exists() or target.is_symlink():
        return
    olds = _leftovers(target, "old")
    if len(olds) > 1:
        raise FileExistsError(
            f"{target} is missing and several interrupted saves left {[p.name for p in olds]} beside it: rename the "
            f"one to keep to {target.name} and delete the others."
        )
    if olds:
        os.replace(olds[0], target)


def restore_interrupted_save(target: str | os.PathLike) -> None:
    """Rename back the old folder of a save killed between its two renames (`target` missing, one `.NAME.old-*`).

    Waits for a save into `target` that is still running: its own `.NAME.old-*` is not a leftover.
    """
    target = Path(target)
    if target.exists() or target.is_symlink() or not target.parent.is_dir() or not _leftovers(target, "old"):
        return
    folder = save_path(target)
    with save_lock(folder):
        _restore(folder)


# What a disk that cannot hold a save reports (the OS error, or safetensors' text of it): what it means, and the fix.
FULL_DISK = {
    errno.ENOSPC: ("no space left on the device", "Free some space"),
    errno.EDQUOT: ("the disk quota is used up", "Free some space (or raise the quota)"),
    errno.EFBIG: (
        "a file would grow past the largest size allowed (the file system's, or the process's `ulimit -f`)",
        "Raise the limit, or save to another file system,",
    ),
}


@contextmanager
def _write_errors(target: Path) -> Iterator[None]:
    """Turn a write that the disk refused into one OSError naming `target`; `atomic_directory` has undone the save."""
    try:
        yield
    except (OSError, SafetensorError) as err:
        code = err.errno if isinstance(err, OSError) else None
        if code is None and (found := re.search(r"\(os error (\d+)\)", str(err))):
            code = int(found.group(1))
        if code not in FULL_DISK:
            raise
        problem, fix = FULL_DISK[code]
        raise OSError(
            f"Could not save {target}: {problem}. The save was undone: {target} is as it was. {fix} and save again."
        ) from err


def _holds_cwd(folder: Path) -> Path | None:
    """The current folder, if it is `folder` or inside it (renaming `folder` moves it)."""
    try:
        cwd = Path.cwd()
    except FileNotFoundError:  # the current folder was deleted: nothing to keep
        return None
    return cwd if cwd == folder or folder in cwd.parents else None


@contextmanager
def atomic_directory(target: str | os.PathLike) -> Iterator[Path]:
    """Yield an empty temp folder beside `target` that replaces `target`, whatever it holds, only if the block succeeds.

    The general primitive (caches use it as is); checkpoints go through `checkpoint_directory`, which
    guards the user's files. A failure or a kill never leaves a half-written `target`, and saves into one folder
    never run at the same time (module docstring).
    """
    target = save_path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    with save_lock(target), _write_errors(target):
        _restore(target)
        for path in _leftovers(target, "tmp") + _leftovers(target, "old"):  # killed saves': we hold the lock
            shutil.rmtree(path, ignore_errors=True)
        tmp = target.parent / f".{target.name}.tmp-{uuid.uuid4().hex[:8]}"
        tmp.mkdir()
        try:
            yield tmp
            cwd = _holds_cwd(target)
            backup = None
            if target.exists():
                backup = target.parent / f".{target.name}.old-{uuid.uuid4().hex[:8]}"
                os.replace(target, backup)
            try:
                os.replace(tmp, target)
            except OSError:
                if backup is not None:
                    os.replace(backup, target)
                raise
            if cwd is not None:  # this process was in the folder just renamed away: back to its path, now the new one
                os.chdir(cwd if cwd.is_dir() else target)
            if backup is not None:
                shutil.rmtree(backup)
        finally:
            if tmp.exists():
                shutil.rmtree(tmp)


def is_checkpoint(folder: str | os.PathLike) -> bool:
    """Whether `folder` holds an optin-hf checkpoint (what `AutoOptinModel.from_pretrained` requires first)."""
    return (Path(folder) / MASKS_NAME).is_file()


def check_save_target(folder: str | os.PathLike, overwrite: bool = False) -> None:
    """Refuse a save into `folder` that cannot succeed, or that would mix a checkpoint into files the user put there
    (module docstring). Every save checks this; the CLI also does before its run, so a doomed save fails first."""
    folder = save_path(folder)
    if folder.exists() and not folder.is_dir():
        raise NotADirectoryError(f"{folder} is not an optin-hf checkpoint but a file: choose a folder to save into.")
    nearest = next(p for p in folder.parents if p.exists())  # where the save creates folders
    if not nearest.is_dir():
        raise NotADirectoryError(f"Cannot save into {folder}: {nearest} is a file, not a folder.")
    if not os.access(nearest, os.W_OK | os.X_OK):
        raise PermissionError(
            f"Cannot save into {folder}: a save writes the new folder beside it, in {nearest}, which this user cannot "
            "write to. Choose a folder inside one you can write to."
        )
    if not folder.exists() or overwrite or is_checkpoint(folder):
        return
    names = sorted(p.name for p in folder.iterdir())
    if names:
        shown = ", ".join(names[:5]) + (f", ... ({len(names)} entries)" if len(names) > 5 else "")
        raise FileExistsError(
            f"{folder} is not empty ({shown}) and is not an optin-hf checkpoint (it has no {MASKS_NAME}). Choose a "
            "new folder, or pass overwrite=True (optin prune: --overwrite) to save into it: the files optin-hf writes "
            f"({', '.join(OWNED_FILES)}) are replaced, the others kept."
        )


def _owned(name: str) -> bool:
    return any(fnmatch.fnmatchcase(name, pattern) for pattern in OWNED_FILES)


def _link_or_copy(src: str | os.PathLike, dst: str | os.PathLike) -> None:
    # A hard link costs nothing and leaves the old folder complete until it is deleted.
    try:
        os.link(src, dst)
    except OSError:
        shutil.copy2(src, dst)


def _carry_user_files(old: Path, new: Path) -> None:
    """Put every entry of `old` that optin-hf does not own into `new`."""
    for entry in old.iterdir():
        if _owned(entry.name):
            continue
        if entry.is_symlink():
            os.symlink(os.readlink(entry), new / entry.name)
        elif entry.is_dir():
            shutil.copytree(entry, new / entry.name, symlinks=True, copy_function=_link_or_copy)
        else:
            _link_or_copy(entry, new / entry.name)


@contextmanager
def checkpoint_directory(target: str | os.PathLike, overwrite: bool = False) -> Iterator[Path]:
    """`atomic_directory` for a checkpoint: refuses a folder that is not one unless `overwrite`, and keeps the
    user's files in the folder it replaces."""
    folder = save_path(target)
    with atomic_directory(folder) as tmp:
        check_save_target(folder, overwrite)  # after atomic_directory restored an interrupted save
        yield tmp
        if folder.is_dir():
            _carry_user_files(folder, tmp)


def write_checkpoint(
    folder: Path,
    model: nn.Module,
    result: PruningResult,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
) -> None:
    """Fill `folder` with the pruned `model` as `result` describes it: the slim model's config and weights
    (skipped when `masks_only`), `optin_config.json`, the masks and the scores when given. A masks-only
    checkpoint of a reconstructed model also holds the refit parameters, which full weights already contain."""
    if not masks_only:
        # Our own key names: save_pretrained would rename keys to legacy checkpoint layouts.
        model.config.architectures = [type(model).__name__]  # the task head to rebuild
        standard = get_adapter(model.config).standard_config(model.config, result.masks)  # a uniform slim LLM: plain transformers loads it
        if standard is None:
            save_model_config(model.config, folder)
        else:
            standard.save_pretrained(folder)
        # A tied LM head is written once, under its source's name (the input embedding), as transformers does.
        tied = list(getattr(model, "_tied_weights_keys", None) or [])
        save_torch_state_dict(model.state_dict(), folder, max_shard_size=max_shard_size, shared_tensors_to_discard=tied)
    result.config.save_pretrained(folder)
    result.masks.save(folder / MASKS_NAME)
    if masks_only and result.reconstruction is not None:
        save_reconstruction(result.reconstruction, folder / RECONSTRUCTION_NAME)
    if scores is not None:
        scores.save(folder / SCORES_NAME)


def save_pruned(
    model: nn.Module,
    save_dir: str | os.PathLike,
    *,
    scores: ImportanceScores | None = None,
    masks_only: bool = False,
    max_shard_size: int | str = MAX_SHARD_SIZE,
    overwrite: bool = False,
) -> None:
    """Write the pruned `model` (the result it carries) to `save_dir` atomically: the slim weights, sharded
    above `max_shard_size` (bytes or "5GB"), or only the masks naming the base model (`masks_only`).

    An earlier checkpoint in `save_dir` is replaced, keeping the files optin-hf did not write there (a
    tokenizer, notes); any other non-empty folder is refused unless `overwrite=True` (module docstring)."""
    result = pruning_result(model)
    if masks_only and not result.config.base_model_name_or_path:
        raise ValueError(
            "A masks-only checkpoint rebuilds the model from its base, and this model's base is unknown (it was "
            "built from a config): set OptinConfig(base_model_name_or_path=...) before pruning, or save the full "
            "slim checkpoint (masks_only=False)."
        )
    if masks_only:
        config = dataclasses.replace(
            result.config, base_model_fingerprint=_base_fingerprint(result.config.base_model_name_or_path)
        )
        result = dataclasses.replace(result, config=config)
    with checkpoint_directory(save_dir, overwrite) as tmp:
        write_checkpoint(tmp, model, result, scores=scores, masks_only=masks_only, max_shard_size=max_shard_size)


def _base_fingerprint(name: str) -> str | None:
    """The fingerprint of a base model in a local folder, which anyone may overwrite; None for a Hub id, whose
    recorded commit pins it."""
    if not Path(name).is_dir():
        return None
    try:
        return weights_fingerprint(name)
    except FileNotFoundError as err:
        raise ValueError(
            f"The base model folder {name} has no safetensors weights ({WEIGHTS_NAME} or {WEIGHTS_INDEX_NAME}), so a "
            "masks-only checkpoint could never be loaded over it: optin-hf never unpickles .bin weights. Save the "
            "full slim checkpoint (masks_only=False), or re-save the base with save_pretrained()."
        ) from err


def save_model_config(config: PretrainedConfig, folder: str | os.PathLike) -> None:
    """Write config.json so that optin-hf reads it and plain transformers refuses it with a readable message."""
    config.save_pretrained(folder)
    path = Path(folder) / MODEL_CONFIG_NAME
    values = json.loads(path.read_text())
    values["transformers_weights"] = NOT_FOR_TRANSFORMERS
    path.write_text(json.dumps(values, indent=2, sort_keys=True) + "\n")


def load_supported_config(name_or_path: str | os.PathLike, source: str | None = None, **hub_kwargs) -> PretrainedConfig:
    """The config of a model optin-hf supports, from a folder or a Hub id.

    config.json is read as plain JSON and its `model_type` checked before transformers resolves any class, so a repo
    with its own code (`auto_map`) is refused, not imported or run; `trust_remote_code=False` backs that up.
    """
    values, _ = PretrainedConfig.get_config_dict(name_or_path, **hub_kwargs)
    if not isinstance(values, dict):
        raise ValueError(f"The {MODEL_CONFIG_NAME} of {source or name_or_path} is a JSON {type(values).__name__}, not a mapping: it is not a transformers config.")
    model_type = values.get("model_type")
    if model_type not in ADAPTERS:
        raise ValueError(
            f"{source or name_or_path} is a {model_type!r} model: optin-hf supports model_type {sorted(ADAPTERS)} "
            "only, and never runs a repository's own code (trust_remote_code)."
        )
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=False, **hub_kwargs)
    except StrictDataclassError as err:  # a field of the wrong type: huggingface_hub's error is no ValueError
        raise ValueError(f"The {MODEL_CONFIG_NAME} of {source or name_or_path} is invalid: {' '.join(str(err).split())}") from err


def load_model_config(folder: str | os.PathLike, source: str | None = None) -> PretrainedConfig:
    """The slim model's config, without the guard written by `save_model_config`."""
    config = load_supported_config(folder, source)
    if "transformers_weights" in config:
        delattr(config, "transformers_weights")
    return config


def _shard_names(folder: Path) -> list[str]:
    """The weight files of `folder`; an index may only name plain file names inside it."""
    index = folder / WEIGHTS_INDEX_NAME
    if not index.is_file():
        if (folder / WEIGHTS_NAME).is_file():
            return [WEIGHTS_NAME]
        raise FileNotFoundError(f"No {WEIGHTS_NAME} (or {WEIGHTS_INDEX_NAME}) in {folder}: the slim weights are missing.")
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
        names = set(weight_map.values())
    except (ValueError, KeyError, TypeError, AttributeError) as err:
        raise ValueError(f"{index} is not a valid weights index (no weight_map of file names): {err}") from err
    for name in names:
        if not isinstance(name, str) or name in ("", ".", "..") or "\\" in name or Path(name).name != name:
            raise ValueError(
                f"{index} names the weights file {name!r}, which is not a plain file name in {folder}: optin-hf reads "
                "weights only from the checkpoint folder itself. Re-save or re-download the checkpoint."
            )
    return sorted(names)


def weights_fingerprint(folder: str | os.PathLike) -> str:
    """The sha256 of a model folder's safetensors weights: every tensor's name, dtype, shape and bytes, in name order,
    so the same weights give the same fingerprint however they are sharded. One read of the weights (about 1 s/GB)."""
    folder = Path(folder)
    digests = {}
    for name in _shard_names(folder):
        try:
            with safe_open(folder / name, framework="pt") as weights:
                for key in weights.keys():
                    tensor = weights.get_tensor(key)
                    digest = hashlib.sha256(f"{tensor.dtype} {list(tensor.shape)}\n".encode())
                    digest.update(tensor.reshape(-1).view(torch.uint8).numpy())
                    digests[key] = digest.hexdigest()
        except (SafetensorError, OSError) as err:
            raise ValueError(f"{folder / name} is not a valid safetensors weights file ({err}). Re-create or "
                             "re-download it.") from err
    return hashlib.sha256("".join(f"{key} {digests[key]}\n" for key in sorted(digests)).encode()).hexdigest()


def load_weights(model: nn.Module, folder: str | os.PathLike) -> None:
    """Load (possibly sharded) safetensors weights into `model`, which may be built on the meta device.

    The tensors are assigned, not copied, so they keep their saved dtype; missing or unexpected keys, shapes that
    differ from the ones the masks built, and parameters still on the meta device afterwards are refused.
    """
    folder = Path(folder)
    state: dict[str, torch.Tensor] = {}
    for name in _shard_names(folder):
        state.update(load_safetensors(folder / name, "model weights"))
    built = model.state_dict()
    retyped = [
        f"{key} is {value.dtype} in the weights, {built[key].dtype} in the model"
        for key, value in state.items()
        if key in built and value.is_floating_point() != built[key].is_floating_point()
    ]
    if retyped:  # else a RuntimeError from load_state_dict, or a forward failing deep inside torch
        raise ValueError(
            f"The weights in {folder} do not fit the model in dtype: {'; '.join(retyped[:3])}"
            f"{f' (and {len(retyped) - 3} more)' if len(retyped) > 3 else ''}. Float parameters must be saved as floats: "
            "save the pruned model again."
        )
    wrong = [
        f"{key} is {list(value.shape)} in the weights, {list(built[key].shape)} from the masks"
        for key, value in state.items()
        if key in built and value.shape != built[key].shape
    ]
    if wrong:
        raise ValueError(
            f"The weights in {folder} do not fit the model that its {MASKS_NAME} describes: {'; '.join(wrong[:3])}"
            f"{f' (and {len(wrong) - 3} more)' if len(wrong) > 3 else ''}. The masks file belongs to another pruned "
            "model: put back the masks saved with these weights, or save the pruned model again."
        )
    result = model.load_state_dict(state, strict=False, assign=True)
    expected_missing = set(getattr(model, "_tied_weights_keys", None) or {})
    missing = [k for k in result.missing_keys if k not in expected_missing]
    if missing or result.unexpected_keys:
        raise ValueError(
            f"The weights in {folder} do not match the pruned model: missing {missing[:5]}, "
            f"unexpected {result.unexpected_keys[:5]}. Were they saved from another model or masks?"
        )
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    empty = [name for name, tensor in [*model.named_parameters(), *model.named_buffers()] if tensor.is_meta]
    if empty:
        raise ValueError(f"The weights in {folder} leave {empty[:5]} unset: were they saved from another model?")
