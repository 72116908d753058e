"""The fake Hub, driven through the real huggingface_hub client; raw HTTP only for payloads the client cannot send."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import urllib.error
import urllib.request
from pathlib import Path

import numpy as np
import pytest
from huggingface_hub import (
    CommitOperationAdd,
    CommitOperationDelete,
    HfApi,
    create_repo,
    get_token,
    hf_hub_download,
    list_repo_files,
    model_info,
    snapshot_download,
    upload_folder,
)
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from hub_server import FakeHub
from safetensors.numpy import load_file, save_file

WEIGHT = np.arange(12, dtype=np.float32).reshape(3, 4)


@pytest.fixture
def model_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "model"
    (folder / "extra").mkdir(parents=True)
    save_file({"weight": WEIGHT}, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({"hidden_size": 4}))
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    (folder / "extra" / "notes.txt").write_text("nested file\n")
    return folder


def _files(folder: Path, *, skip: tuple[str, ...] = ()) -> dict[str, bytes]:
    return {
        path.relative_to(folder).as_posix(): path.read_bytes()
        for path in folder.rglob("*")
        if path.is_file() and path.name not in skip
    }


def test_upload_folder_then_download_files_and_snapshot(hub_server: FakeHub, model_folder: Path) -> None:
    repo_id = create_repo("tiny").repo_id  # no namespace: the repo lands in the token owner's
    assert repo_id == "test-user/tiny"
    commit = upload_folder(repo_id=repo_id, folder_path=model_folder, commit_message="Add tiny model")
    uploaded = _files(model_folder)

    assert re.fullmatch(r"[0-9a-f]{40}", commit.oid)
    assert sorted(list_repo_files(repo_id)) == sorted([".gitattributes", *uploaded])
    info = model_info(repo_id)
    assert info.sha == commit.oid
    assert sorted(sibling.rfilename for sibling in info.siblings) == sorted([".gitattributes", *uploaded])
    for name, content in uploaded.items():
        assert Path(hf_hub_download(repo_id, name)).read_bytes() == content

    snapshot = Path(snapshot_download(repo_id))
    assert snapshot.name == commit.oid
    assert _files(snapshot, skip=(".gitattributes",)) == uploaded
    np.testing.assert_array_equal(load_file(str(snapshot / "model.safetensors"))["weight"], WEIGHT)
    # Everything went inline in the commit payload: no LFS or Xet endpoint was ever involved.
    assert not [request for request in hub_server.requests if re.search(r"lfs|xet", request)]

    # Re-uploading identical files is a no-op: preupload returns their oids and the client skips the commit.
    assert upload_folder(repo_id=repo_id, folder_path=model_folder).oid == commit.oid
    assert sum("/commit/" in request for request in hub_server.requests) == 1


def test_old_revision_stays_downloadable_by_commit_sha(hub_server: FakeHub) -> None:
    api = HfApi()
    repo_id = api.create_repo("history").repo_id
    first = api.create_commit(
        repo_id,
        [CommitOperationAdd("config.json", b'{"v": 1}'), CommitOperationAdd("extra/old.txt", b"old")],
        commit_message="v1",
    )
    second = api.create_commit(
        repo_id,
        [CommitOperationAdd("config.json", b'{"v": 2}'), CommitOperationDelete("extra/")],
        commit_message="v2",
    )

    assert first.oid != second.oid
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b'{"v": 2}'
    assert Path(hf_hub_download(repo_id, "config.json", revision=first.oid)).read_bytes() == b'{"v": 1}'
    assert api.repo_info(repo_id, revision=first.oid).sha == first.oid
    assert api.repo_info(repo_id).sha == second.oid
    assert "extra/old.txt" in api.list_repo_files(repo_id, revision=first.oid)
    assert "extra/old.txt" not in api.list_repo_files(repo_id)
    old_snapshot = Path(snapshot_download(repo_id, revision=first.oid))
    assert _files(old_snapshot, skip=(".gitattributes",)) == {"config.json": b'{"v": 1}', "extra/old.txt": b"old"}


def test_create_repo_conflict_exist_ok_and_auth(hub_server: FakeHub) -> None:
    api = HfApi()
    api.create_repo("test-user/twice")
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo("test-user/twice")
    assert conflict.value.response.status_code == 409
    assert api.create_repo("test-user/twice", exist_ok=True).repo_id == "test-user/twice"
    with pytest.raises(HfHubHTTPError) as anonymous:
        api.create_repo("test-user/anonymous", token=False)
    assert anonymous.value.response.status_code == 401


def test_private_repo_is_hidden_from_anonymous_clients(hub_server: FakeHub) -> None:
    api = HfApi()
    repo_id = api.create_repo("secret", private=True).repo_id
    api.upload_file(path_or_fileobj=b"{}", path_in_repo="config.json", repo_id=repo_id)

    with pytest.raises(RepositoryNotFoundError):
        api.model_info(repo_id, token=False)
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(repo_id, "config.json", token=False)
    assert api.model_info(repo_id).private is True
    assert Path(hf_hub_download(repo_id, "config.json")).read_bytes() == b"{}"


def test_missing_repo_file_and_revision_raise_the_client_errors(hub_server: FakeHub) -> None:
    api = HfApi()
    repo_id = api.create_repo("errors").repo_id
    missing_repo = "test-user/does-not-exist"

    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(missing_repo, "config.json")
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(missing_repo)
    with pytest.raises(RepositoryNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=missing_repo)
    with pytest.raises(RepositoryNotFoundError):
        api.delete_file("a.txt", missing_repo)
    with pytest.raises(EntryNotFoundError):
        hf_hub_download(repo_id, "missing.json")
    with pytest.raises(EntryNotFoundError):
        api.delete_file("missing.json", repo_id)
    with pytest.raises(RevisionNotFoundError):
        hf_hub_download(repo_id, ".gitattributes", revision="no-such-branch")
    with pytest.raises(RevisionNotFoundError):
        api.repo_info(repo_id, revision="0" * 40)
    with pytest.raises(RevisionNotFoundError):
        api.upload_file(path_or_fileobj=b"x", path_in_repo="a.txt", repo_id=repo_id, revision="no-such-branch")


def _line(item: dict) -> bytes:
    return json.dumps(item).encode() + b"\n"


_HEADER = _line({"key": "header", "value": {"summary": "raw commit", "description": ""}})
_FILE = {"path": "a.txt", "content": "eA==", "encoding": "base64"}


def _post_commit(hub: FakeHub, repo_id: str, payload: bytes) -> tuple[int, str | None]:
    request = urllib.request.Request(
        f"{hub.endpoint}/api/models/{repo_id}/commit/main",
        data=payload,
        headers={"Authorization": f"Bearer {get_token()}", "Content-Type": "application/x-ndjson"},
    )
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, None
    except urllib.error.HTTPError as err:
        return err.code, err.headers.get("X-Error-Message")


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        pytest.param(b"{not json\n", "Malformed JSON", id="not-ndjson"),
        pytest.param(_line({"key": "file", "value": _FILE}), "header", id="no-header"),
        pytest.param(_line({"key": "header", "value": {"description": ""}}), "summary", id="no-summary"),
        pytest.param(_HEADER + _line({"key": "rename", "value": _FILE}), "rename", id="unknown-operation"),
        pytest.param(_HEADER + _line({"key": "file", "value": {**_FILE, "mode": "755"}}), "mode", id="unknown-field"),
        pytest.param(_HEADER + _line({"key": "file", "value": {**_FILE, "content": "x!"}}), "base64", id="bad-base64"),
        pytest.param(_HEADER + _line({"key": "file", "value": {**_FILE, "path": "../a"}}), "path", id="path-escape"),
        pytest.param(_HEADER + _line({"key": "lfsFile", "value": {"path": "a.bin"}}), "LFS", id="lfs-pointer"),
    ],
)
def test_malformed_commit_payload_is_rejected(hub_server: FakeHub, payload: bytes, reason: str) -> None:
    api = HfApi()
    repo_id = api.create_repo("raw").repo_id
    head = api.repo_info(repo_id).sha

    status, message = _post_commit(hub_server, repo_id, payload)
    assert status == 400, message
    assert message is not None and reason in message
    assert api.repo_info(repo_id).sha == head

    # The same request with a well-formed payload goes through: the 400 was about the payload alone.
    assert _post_commit(hub_server, repo_id, _HEADER + _line({"key": "file", "value": _FILE})) == (200, None)
    assert Path(hf_hub_download(repo_id, "a.txt")).read_bytes() == b"x"


_DOWNLOAD_SCRIPT = """
import json, sys
from huggingface_hub import hf_hub_download, snapshot_download
repo_id = sys.argv[1]
print(json.dumps({"snapshot": snapshot_download(repo_id), "config": hf_hub_download(repo_id, "config.json")}))
"""


def _download_in_subprocess(repo_id: str, **env: str) -> dict[str, str]:
    """A fresh interpreter, where huggingface_hub reads HF_ENDPOINT/HF_HUB_CACHE/HF_HUB_OFFLINE at import."""
    result = subprocess.run(
        [sys.executable, "-c", _DOWNLOAD_SCRIPT, repo_id],
        env={**os.environ, **env},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    return json.loads(result.stdout.splitlines()[-1])


def test_subprocess_downloads_via_hf_endpoint_then_loads_offline(hub_server: FakeHub, model_folder: Path) -> None:
    repo_id = create_repo("offline").repo_id
    commit = upload_folder(repo_id=repo_id, folder_path=model_folder)

    online = _download_in_subprocess(repo_id)
    assert Path(online["snapshot"]).name == commit.oid
    assert f"GET /{repo_id}/resolve/{commit.oid}/model.safetensors" in hub_server.requests

    hub_server.stop()  # from here on, anything that is not read from the cache fails
    offline = _download_in_subprocess(repo_id, HF_HUB_OFFLINE="1")
    assert offline == online
    assert _files(Path(offline["snapshot"]), skip=(".gitattributes",)) == _files(model_folder)
    assert Path(offline["config"]).read_bytes() == (model_folder / "config.json").read_bytes()


@pytest.mark.parametrize("run", ["first", "second"])
def test_transformers_talks_to_each_tests_server(hub_server: FakeHub, run: str) -> None:
    # transformers builds one HfApi on first use; without the fixture dropping it, the second test's push would go
    # to the first test's stopped server.
    from transformers import BertConfig

    BertConfig(hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=8).push_to_hub("cfg")
    assert "test-user/cfg" in hub_server.repos
