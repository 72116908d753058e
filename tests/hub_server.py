"""A strict fake of the Hugging Face Hub HTTP API on 127.0.0.1, for tests only.

It speaks the subset of the protocol that the real ``huggingface_hub`` (2.4) client uses to create a model repo,
commit files to it and read them back (``create_repo``, ``upload_folder``/``upload_file``/``create_commit``,
``hf_hub_download``, ``snapshot_download``, ``model_info``/``repo_info``, ``list_repo_files``/``list_repo_tree``), so
push and pull code can be tested end to end without network. Requests outside that subset, or shaped differently
from what the client sends, are rejected loudly rather than approximated, so a test cannot pass on a request the
real Hub would refuse.

Deliberate differences from the real Hub:

- the preupload call answers ``"regular"`` for every file, so all content travels inline (base64) in the commit
  payload and neither LFS nor Xet storage is involved; an ``lfsFile`` commit operation is therefore a 400;
- model repos with ``namespace/name`` ids only; commits go to existing branches (only ``main`` exists), no pull
  requests, tags or extra branches, and ``.gitignore`` rules are not applied (``shouldIgnore`` is always false);
- there are no users: any well-formed bearer token is accepted; anonymous requests can read public repos only.

Pointing the client at it: ``huggingface_hub`` copies ``HF_ENDPOINT`` into ``constants.ENDPOINT`` and
``constants.HUGGINGFACE_CO_URL_TEMPLATE`` when it is imported, and the module-level helpers
(``huggingface_hub.upload_folder``, ``model_info``...) are methods of an ``HfApi`` instance built at import time. In
the test process, patch those three (the ``hub_server`` fixture in ``tests/conftest.py`` does, or pass
``endpoint=hub.endpoint`` to ``HfApi``/``hf_hub_download``/``snapshot_download``); in a subprocess, set
``HF_ENDPOINT`` in its environment before it imports ``huggingface_hub``.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import itertools
import json
import re
import threading
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from types import TracebackType
from typing import Any
from urllib.parse import parse_qs, unquote, urlsplit

DEFAULT_BRANCH = "main"

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,95}")
_FORBIDDEN_SEGMENTS = {"", ".", "..", ".git"}
# The Hub seeds every new repo with an "initial commit" holding a .gitattributes; mirror it so that file listings
# and snapshots look like the real ones.
_INITIAL_GITATTRIBUTES = b"".join(
    pattern + b" filter=lfs diff=lfs merge=lfs -text\n"
    for pattern in (b"*.bin", b"*.h5", b"*.msgpack", b"*.onnx", b"*.pt", b"*.pth", b"*.safetensors", b"*.zip")
)

Response = tuple[int, dict[str, str], bytes]


class HubError(Exception):
    """An error answered like the Hub does: the client maps ``X-Error-Code`` to its exception classes."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        *,
        headers: dict[str, str] | None = None,
        extra: dict[str, Any] | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = headers or {}
        self.extra = extra or {}


def git_blob_oid(content: bytes) -> str:
    """Git's blob id: the Hub's ETag for a regular file, and the ``oid`` the client compares to skip unchanged files."""
    return hashlib.sha1(b"blob %d\0" % len(content) + content).hexdigest()


@dataclass(frozen=True)
class Commit:
    oid: str
    summary: str
    description: str
    files: dict[str, bytes]  # full snapshot of the repo at this commit
    date: datetime


@dataclass
class Repo:
    repo_id: str
    private: bool
    created_at: datetime
    branches: dict[str, str] = field(default_factory=dict)  # branch name -> commit oid
    commits: dict[str, Commit] = field(default_factory=dict)  # every commit ever made, so old revisions resolve

    def resolve(self, revision: str) -> Commit:
        """A branch name or a full commit sha, as the client sends them."""
        commit = self.commits.get(self.branches.get(revision, revision))
        if commit is None:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return commit

    def branch_head(self, revision: str) -> Commit:
        """Commits can only be made on top of a branch, never on a detached sha."""
        if revision not in self.branches:
            raise HubError(404, f"Invalid rev id: {revision}", "RevisionNotFound")
        return self.commits[self.branches[revision]]


class FakeHub:
    """The server, serving from construction until ``stop()``; its state is plain data that tests may inspect.

    ``repos`` maps repo ids to ``Repo``; ``requests`` logs every request as ``"METHOD /path"`` (query string dropped).
    """

    def __init__(self, username: str = "test-user") -> None:
        self.username = username  # namespace of repos created without an organization, as for the token's owner
        self.repos: dict[str, Repo] = {}
        self.requests: list[str] = []
        self.lock = threading.Lock()
        self._commit_counter = itertools.count()
        self._httpd = _Server(self)
        self.endpoint = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        # A short poll interval keeps stop() (which waits for the serving loop to notice) from costing ~0.5 s per test.
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, name="fake-hub", daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        """Stop serving; later connections are refused as when the Hub is unreachable. Safe to call twice."""
        if self._thread.is_alive():
            self._httpd.shutdown()
            self._thread.join()
        self._httpd.server_close()

    def __enter__(self) -> FakeHub:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def _add_commit(self, repo: Repo, branch: str, files: dict[str, bytes], summary: str, description: str) -> Commit:
        parent = repo.branches.get(branch, "")
        seed = f"{repo.repo_id}\0{parent}\0{summary}\0{next(self._commit_counter)}".encode()
        commit = Commit(hashlib.sha1(seed).hexdigest(), summary, description, files, datetime.now(timezone.utc))
        repo.commits[commit.oid] = commit
        repo.branches[branch] = commit.oid
        return commit


class _Server(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, hub: FakeHub) -> None:
        super().__init__(("127.0.0.1", 0), _Handler)
        self.hub = hub


class _Handler(BaseHTTPRequestHandler):
    # HTTP/1.0: one request per connection, so stopping the server leaves no handler thread parked on a keep-alive.
    protocol_version = "HTTP/1.0"
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silenced: ``FakeHub.requests`` records the traffic without cluttering test output."""

    def do_GET(self) -> None:
        self._dispatch()

    def do_HEAD(self) -> None:
        self._dispatch()

    def do_POST(self) -> None:
        self._dispatch()

    def _dispatch(self) -> None:
        hub = self.server.hub
        url = urlsplit(self.path)
        segments = [unquote(segment) for segment in url.path.split("/")[1:]]
        query = parse_qs(url.query, keep_blank_values=True)
        with hub.lock:
            hub.requests.append(f"{self.command} {url.path}")
        try:
            body = self._read_body()  # always drained first, so an error reply never races an unread upload
            with hub.lock:
                status, headers, payload = self._route(segments, query, body)
        except Exception as exc:
            # A bug in the fake must surface as a readable 500, not as a dropped connection the client retries.
            err = exc if isinstance(exc, HubError) else HubError(500, f"Fake Hub bug: {exc!r}")
            status = err.status
            headers = {"Content-Type": "application/json", "X-Error-Message": _header_safe(err.message), **err.headers}
            if err.code is not None:
                headers["X-Error-Code"] = err.code
            payload = json.dumps({"error": err.message, **err.extra}).encode()
        self.send_response(status)
        for name, value in {**headers, "Content-Length": str(len(payload))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(payload)

    def _read_body(self) -> bytes:
        if "Transfer-Encoding" in self.headers:
            raise HubError(411, "Chunked request bodies are not supported: send a Content-Length")
        length = self.headers.get("Content-Length")
        if length is None:
            if self.command == "POST":
                raise HubError(411, "A POST needs a Content-Length")
            return b""
        if not length.isdigit():
            raise HubError(400, f"Bad Content-Length: {length!r}")
        return self.rfile.read(int(length))

    def _route(self, segments: list[str], query: dict[str, list[str]], body: bytes) -> Response:
        method = self.command
        match segments:
            case ["api", "repos", "create"] if method == "POST":
                return self._create_repo(body)
            case ["api", "validate-yaml"] if method == "POST":
                # Called before committing a README.md; the fake accepts any model card metadata.
                _json_object(body, required={"content", "repoType"})
                return _json({"errors": [], "warnings": []})
            case ["api", "agent-harnesses"] if method == "GET":
                # Best-effort registry fetched by the client's user-agent builder on its first request.
                return _json({"standardEnvVars": [], "harnesses": {}})
            case ["api", "models", namespace, name] if method == "GET":
                return self._info(f"{namespace}/{name}", DEFAULT_BRANCH, query)
            case ["api", "models", namespace, name, "revision", revision] if method == "GET":
                return self._info(f"{namespace}/{name}", revision, query)
            case ["api", "models", namespace, name, "tree", revision, *path] if method == "GET":
                return self._tree(f"{namespace}/{name}", revision, "/".join(path), query)
            case ["api", "models", namespace, name, "preupload", revision] if method == "POST":
                return self._preupload(f"{namespace}/{name}", revision, query, body)
            case ["api", "models", namespace, name, "commit", revision] if method == "POST":
                return self._commit(f"{namespace}/{name}", revision, query, body)
            case [namespace, name, "resolve", revision, *path] if method in ("GET", "HEAD") and path:
                return self._resolve(f"{namespace}/{name}", revision, "/".join(path), query)
        raise HubError(404, f"{method} /{'/'.join(segments)} is not served by the fake Hub")

    def _authenticated(self) -> bool:
        value = self.headers.get("Authorization")
        if value is None:
            return False
        scheme, _, token = value.partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise HubError(401, "Invalid credentials in Authorization header")
        return True

    def _repo(self, repo_id: str, *, write: bool = False) -> Repo:
        authenticated = self._authenticated()
        repo = self.server.hub.repos.get(repo_id)
        if repo is None or (repo.private and not authenticated):
            # Like the Hub: 401 when anonymous, 404 otherwise, and a private repo looks exactly like a missing one.
            raise HubError(404 if authenticated else 401, "Repository not found", "RepoNotFound")
        if write and not authenticated:
            raise HubError(401, "You must be authenticated to write to a repository")
        return repo

    def _create_repo(self, body: bytes) -> Response:
        hub = self.server.hub
        if not self._authenticated():
            raise HubError(401, "You must be authenticated to create a repository")
        payload = _json_object(body, required={"name"}, optional={"organization", "visibility", "type"})
        name, namespace = payload["name"], payload.get("organization") or hub.username
        for part in (name, namespace):
            if not isinstance(part, str) or not _NAME.fullmatch(part):
                raise HubError(400, f"Invalid repo name or namespace: {part!r}")
        if payload.get("type", "model") != "model":
            raise HubError(400, f"The fake Hub only hosts model repos, not {payload['type']!r}")
        visibility = payload.get("visibility", "public")
        if visibility not in ("public", "private"):
            raise HubError(400, f"Invalid visibility: {visibility!r}")
        repo_id = f"{namespace}/{name}"
        url = f"{hub.endpoint}/{repo_id}"
        if repo_id in hub.repos:
            # The client's exist_ok=True path reads "url" from this 409 body.
            raise HubError(409, "You already created this model repo", extra={"url": url})
        repo = Repo(repo_id, private=visibility == "private", created_at=datetime.now(timezone.utc))
        hub.repos[repo_id] = repo
        hub._add_commit(repo, DEFAULT_BRANCH, {".gitattributes": _INITIAL_GITATTRIBUTES}, "initial commit", "")
        return _json({"url": url, "name": repo_id})

    def _info(self, repo_id: str, revision: str, query: dict[str, list[str]]) -> Response:
        blobs = _flags(query, "blobs")["blobs"]
        repo = self._repo(repo_id)
        commit = repo.resolve(revision)
        siblings = [
            {"rfilename": path, **({"size": len(content), "blobId": git_blob_oid(content)} if blobs else {})}
            for path, content in sorted(commit.files.items())
        ]
        return _json(
            {
                "id": repo_id,
                "author": repo_id.split("/")[0],
                "sha": commit.oid,
                "lastModified": _iso(commit.date),
                "createdAt": _iso(repo.created_at),
                "private": repo.private,
                "gated": False,
                "disabled": False,
                "siblings": siblings,
            }
        )

    def _tree(self, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> Response:
        flags = _flags(query, "recursive", "expand")
        if flags["expand"]:
            raise HubError(400, "expand=true (last commit and security info) is not supported by the fake Hub")
        commit = self._repo(repo_id).resolve(revision)
        prefix = f"{path}/" if path else ""
        below = {p: c for p, c in commit.files.items() if p.startswith(prefix)}
        if path and not below:
            raise HubError(404, f"Folder {path} does not exist at {revision}", "EntryNotFound")
        folders: set[str] = set()
        for file_path in below:
            parents = file_path[len(prefix) :].split("/")[:-1]
            folders.update(prefix + "/".join(parents[:depth]) for depth in range(1, len(parents) + 1))
        entries: list[dict[str, Any]] = [
            {"type": "file", "oid": git_blob_oid(c), "size": len(c), "path": p} for p, c in below.items()
        ]
        entries += [{"type": "directory", "oid": _tree_oid(commit.files, f), "size": 0, "path": f} for f in folders]
        if not flags["recursive"]:
            entries = [e for e in entries if "/" not in e["path"][len(prefix) :]]
        return _json(sorted(entries, key=lambda entry: entry["path"]))

    def _preupload(self, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes) -> Response:
        _reject_query(query)
        head = self._repo(repo_id, write=True).branch_head(revision)
        payload = _json_object(body, required={"files"}, optional={"gitIgnore"})
        if not isinstance(payload["files"], list) or not payload["files"]:
            raise HubError(400, "'files' must be a non-empty list")
        answers = []
        for entry in payload["files"]:
            entry = _fields(entry, required={"path", "sample", "size"})
            path = _repo_path(entry["path"])
            _b64(entry["sample"], "sample")
            if not isinstance(entry["size"], int) or entry["size"] < 0:
                raise HubError(400, f"Invalid size for {path}: {entry['size']!r}")
            answer: dict[str, Any] = {"path": path, "uploadMode": "regular", "shouldIgnore": False}
            if path in head.files:
                answer["oid"] = git_blob_oid(head.files[path])
            answers.append(answer)
        return _json({"files": answers, "commitOid": head.oid})

    def _commit(self, repo_id: str, revision: str, query: dict[str, list[str]], body: bytes) -> Response:
        _reject_query(query)
        if self.headers.get("Content-Type", "").split(";")[0].strip() != "application/x-ndjson":
            raise HubError(400, "A commit payload must be sent as application/x-ndjson")
        repo = self._repo(repo_id, write=True)
        head = repo.branch_head(revision)
        lines = body.split(b"\n")
        if lines[-1] == b"":
            lines.pop()
        items = [_json_object(line, required={"key", "value"}) for line in lines]
        if not items or items[0]["key"] != "header":
            raise HubError(400, "The first line of a commit payload must be its header")
        header = _fields(items[0]["value"], required={"summary"}, optional={"description", "parentCommit"})
        summary, description = header["summary"], header.get("description", "")
        if not isinstance(summary, str) or not summary.strip() or not isinstance(description, str):
            raise HubError(400, "The commit header needs a non-empty string summary and a string description")
        parent = header.get("parentCommit")
        if parent is not None and not (isinstance(parent, str) and len(parent) >= 5 and head.oid.startswith(parent)):
            raise HubError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(head.files)
        for item in items[1:]:
            key, value = item["key"], item["value"]
            if key == "file":
                value = _fields(value, required={"path", "content", "encoding"})
                if value["encoding"] != "base64":
                    raise HubError(400, f"Unsupported file encoding: {value['encoding']!r}")
                files[_repo_path(value["path"])] = _b64(value["content"], "content")
            elif key == "deletedFile":
                path = _repo_path(_fields(value, required={"path"})["path"])
                if files.pop(path, None) is None:
                    raise HubError(404, f"A file with this name doesn't exist: {path}", "EntryNotFound")
            elif key == "deletedFolder":
                folder = _repo_path(_fields(value, required={"path"})["path"], folder=True) + "/"
                doomed = [p for p in files if p.startswith(folder)]
                if not doomed:
                    raise HubError(404, f"A folder with this name doesn't exist: {folder}", "EntryNotFound")
                for path in doomed:
                    del files[path]
            elif key == "lfsFile":
                raise HubError(400, "LFS files are not stored by the fake Hub: preupload only grants 'regular' mode")
            else:
                raise HubError(400, f"Unknown commit operation key: {key!r}")
        clashes = sorted({p.rsplit("/", i)[0] for p in files for i in range(1, p.count("/") + 1)} & files.keys())
        if clashes:
            raise HubError(400, f"Paths used both as a file and as a folder: {clashes}")
        commit = self.server.hub._add_commit(repo, revision, files, summary, description)
        commit_url = f"{self.server.hub.endpoint}/{repo_id}/commit/{commit.oid}"
        return _json({"success": True, "commitOid": commit.oid, "commitUrl": commit_url})

    def _resolve(self, repo_id: str, revision: str, path: str, query: dict[str, list[str]]) -> Response:
        _reject_query(query)
        commit = self._repo(repo_id).resolve(revision)
        if path not in commit.files:
            # X-Repo-Commit lets the client cache the file's absence for this commit.
            raise HubError(404, "Entry not found", "EntryNotFound", headers={"X-Repo-Commit": commit.oid})
        content = commit.files[path]
        headers = {
            "Content-Type": "application/octet-stream",
            "ETag": f'"{git_blob_oid(content)}"',
            "X-Repo-Commit": commit.oid,
        }
        return 200, headers, content


def _json(value: Any) -> Response:
    return 200, {"Content-Type": "application/json"}, json.dumps(value).encode()


def _json_object(raw: bytes, *, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> dict:
    try:
        value = json.loads(raw)
    except (UnicodeDecodeError, json.JSONDecodeError) as err:
        raise HubError(400, f"Malformed JSON: {err}") from None
    return _fields(value, required=required, optional=optional)


def _fields(value: Any, *, required: set[str], optional: frozenset[str] | set[str] = frozenset()) -> dict:
    """The exact key set the client sends: a missing or unexpected key means a malformed request."""
    if not isinstance(value, dict):
        raise HubError(400, f"Expected a JSON object, got {type(value).__name__}")
    missing, unknown = required - value.keys(), value.keys() - required - optional
    if missing:
        raise HubError(400, f"Missing keys: {sorted(missing)}")
    if unknown:
        raise HubError(400, f"Unknown keys: {sorted(unknown)}")
    return value


def _flags(query: dict[str, list[str]], *names: str) -> dict[str, bool]:
    """Boolean query parameters as the client encodes them ("true"/"false"); any other parameter is rejected."""
    _reject_query({k: v for k, v in query.items() if k not in names})
    flags = {}
    for name in names:
        values = query.get(name, ["false"])
        if len(values) != 1 or values[0] not in ("true", "false"):
            raise HubError(400, f"Bad value for {name}: {values}")
        flags[name] = values[0] == "true"
    return flags


def _reject_query(query: dict[str, list[str]]) -> None:
    if query:
        raise HubError(400, f"Unsupported query parameters for the fake Hub: {sorted(query)}")


def _repo_path(path: Any, *, folder: bool = False) -> str:
    """A normalized relative path; a folder may come with the trailing slash the client adds."""
    if not isinstance(path, str):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    normalized = path.rstrip("/") if folder else path
    if normalized.startswith("/") or _FORBIDDEN_SEGMENTS & set(normalized.split("/")):
        raise HubError(400, f"Invalid path in repo: {path!r}")
    return normalized


def _b64(value: Any, what: str) -> bytes:
    if not isinstance(value, str):
        raise HubError(400, f"Base64 {what} must be a string")
    try:
        return base64.b64decode(value, validate=True)
    except binascii.Error as err:
        raise HubError(400, f"Invalid base64 {what}: {err}") from None


def _tree_oid(files: dict[str, bytes], folder: str) -> str:
    listing = "".join(f"{p}\0{git_blob_oid(c)}\n" for p, c in sorted(files.items()) if p.startswith(f"{folder}/"))
    return hashlib.sha1(b"tree " + listing.encode()).hexdigest()


def _iso(moment: datetime) -> str:
    """The one timestamp format ``huggingface_hub.utils.parse_datetime`` accepts."""
    return moment.strftime("%Y-%m-%dT%H:%M:%S.") + f"{moment.microsecond // 1000:03d}Z"


def _header_safe(text: str) -> str:
    return text.encode("ascii", "backslashreplace").decode("ascii")
