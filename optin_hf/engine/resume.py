"""Resumable scoring: raw losses saved as they are computed, tagged with what they depend on.

Each process writes its own safetensors file, to a temp file renamed over the old one, so a
kill never leaves a torn file. A resumed run merges the files of every process (whatever the
number of processes was) and refuses files written for another model, data or settings.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn

FORMAT = "optin-raw-losses-v1"
FILE_PREFIX = "raw_losses"
PARTS = {
    "model_config": "model config",
    "weights": "model weights",
    "calibration": "calibration data",
    "settings": "settings",
}


def _tensor_bytes(tensor: torch.Tensor) -> bytes:
    return tensor.detach().contiguous().reshape(-1).view(torch.uint8).cpu().numpy().tobytes()


def _digest(tensors: dict[str, torch.Tensor]) -> str:
    h = hashlib.blake2b(digest_size=16)
    for name in sorted(tensors):
        h.update(f"{name}|{tuple(tensors[name].shape)}|{tensors[name].dtype}|".encode())
        h.update(_tensor_bytes(tensors[name]))
    return h.hexdigest()


def fingerprint(model: nn.Module, batches: list[dict[str, torch.Tensor]], settings: dict) -> dict[str, str]:
    """What raw losses depend on: model config, weights and calibration data (hashed), and the
    scoring settings (by value, so a mismatch can be named)."""
    config = {k: v for k, v in model.config.to_dict().items() if k != "_name_or_path"}  # where it was loaded from
    config_json = json.dumps(config, sort_keys=True, default=str).encode()
    return {
        "model_config": hashlib.blake2b(config_json, digest_size=16).hexdigest(),
        "weights": _digest(dict(model.state_dict())),
        "calibration": _digest({f"{b}.{k}": v for b, batch in enumerate(batches) for k, v in batch.items()}),
        "settings": json.dumps(settings, sort_keys=True),
    }


def _settings_change(saved: str | None, now: str) -> str:
    then, current = json.loads(saved or "{}"), json.loads(now)
    keys = sorted(k for k in set(then) | set(current) if then.get(k) != current.get(k))
    return " (" + ", ".join(f"{k}: {then.get(k)!r} there, {current.get(k)!r} now" for k in keys) + ")"


class LossCheckpoint:
    """The raw losses of one scoring run in `directory`; `process_index` names this process's file.

    `prefix` keeps runs of different candidates (head/neuron, token) that share a folder apart.
    """

    def __init__(self, directory: str | os.PathLike, fingerprint: dict[str, str], process_index: int, prefix: str = FILE_PREFIX):
        self.directory = Path(directory)
        self.fingerprint = fingerprint
        self.prefix = prefix
        self.path = self.directory / f"{prefix}.process{process_index}.safetensors"

    def load_into(self, tensors: dict[str, torch.Tensor]) -> None:
        """Merge every process's saved losses into `tensors` ("<kind>.md", ".kl", ".done")."""
        for path in sorted(self.directory.glob(f"{self.prefix}.process*.safetensors")):
            try:
                with safe_open(str(path), "pt") as f:
                    metadata = f.metadata() or {}
                    self._check(path, metadata)
                    saved = {k: f.get_tensor(k) for k in f.keys()}
            except (SafetensorError, OSError) as err:
                raise ValueError(
                    f"{path} is not a readable raw-losses file ({err}). Delete it to recompute its losses, or point "
                    "OptinConfig.checkpoint_dir to a new folder."
                ) from err
            for kind in {k.split(".")[0] for k in saved}:
                done = saved[f"{kind}.done"]
                for field in ("md", "kl"):
                    tensors[f"{kind}.{field}"][done] = saved[f"{kind}.{field}"][done]
                tensors[f"{kind}.done"] |= done

    def _check(self, path: Path, metadata: dict[str, str]) -> None:
        if metadata.get("format") != FORMAT:
            raise ValueError(f"{path} is not an optin-hf raw-losses checkpoint (format {metadata.get('format')!r}).")
        saved = json.loads(metadata["fingerprint"])
        differ = [
            name + (_settings_change(saved.get(key), self.fingerprint[key]) if key == "settings" else "")
            for key, name in PARTS.items()
            if saved.get(key) != self.fingerprint[key]
        ]
        if differ:
            raise ValueError(
                f"Cannot resume from {self.directory}: its raw losses were computed with other {'; '.join(differ)}. "
                "Point OptinConfig.checkpoint_dir to a new folder, or delete this one."
            )

    def save(self, tensors: dict[str, torch.Tensor]) -> None:
        """Write atomically: a temp file in the same folder, then os.replace."""
        self.directory.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        metadata = {"format": FORMAT, "fingerprint": json.dumps(self.fingerprint, sort_keys=True)}
        save_file({k: v.contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
        os.replace(tmp, self.path)
