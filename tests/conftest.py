"""Shared fixtures.

huggingface_hub freezes its cache, token and config paths into ``huggingface_hub.constants`` when first imported, so
they are redirected here, at conftest import time (before any test module imports it), to a throw-away folder: no
test may read the user's token or write to the user's cache. The Hub token is dropped for the same reason.
"""

from __future__ import annotations

import os
import shutil
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from hub_server import FakeHub

FAKE_TOKEN = "hf_fake_token_for_tests"

if "huggingface_hub" in sys.modules:
    raise RuntimeError("huggingface_hub was imported before tests/conftest.py could redirect its paths")

_HF_HOME = tempfile.mkdtemp(prefix="optin-hf-tests-hf-home-")
for _variable in ("HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_HUB_CACHE"):
    os.environ.pop(_variable, None)
os.environ.update(
    {
        "HF_HOME": _HF_HOME,
        "HF_HUB_CACHE": os.path.join(_HF_HOME, "hub"),
        "HF_XET_CACHE": os.path.join(_HF_HOME, "xet"),
        "HF_TOKEN_PATH": os.path.join(_HF_HOME, "token"),
        "HF_HUB_DISABLE_TELEMETRY": "1",
    }
)


def pytest_unconfigure(config: pytest.Config) -> None:
    shutil.rmtree(_HF_HOME, ignore_errors=True)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """One torch thread for a module of tiny models (`pytestmark = pytest.mark.usefixtures("one_thread")`):
    they gain nothing from threads, and on a busy small machine spinning threads cost 10x or more."""
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture
def count_calls(monkeypatch: pytest.MonkeyPatch):
    """`count_calls(owner, name)` wraps `owner.name` for the test, each call going through and appending 1 to the list
    it returns: how often the code under test ran it."""

    def count(owner, name: str) -> list[int]:
        calls: list[int] = []
        original = getattr(owner, name)

        def counted(*args, **kwargs):
            calls.append(1)
            return original(*args, **kwargs)

        monkeypatch.setattr(owner, name, counted)
        return calls

    return count


@pytest.fixture
def hub_server(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FakeHub]:
    """A fresh ``FakeHub`` that this process's huggingface_hub talks to, with an empty per-test cache.

    Patched in-process: ``constants.ENDPOINT`` (read by ``HfApi()`` and ``snapshot_download``),
    ``constants.HUGGINGFACE_CO_URL_TEMPLATE`` (read by ``hf_hub_download``), the endpoint of the module-level ``HfApi``
    behind ``huggingface_hub.create_repo`` & co, ``constants.HF_HUB_CACHE``, and ``constants.HF_HUB_OFFLINE`` (off,
    even if the suite runs with ``HF_HUB_OFFLINE=1``). ``HfApi`` objects built before the fixture keep their old
    endpoint, except transformers' shared one (``transformers.utils.hub._hf_api``, built on first use), which is
    dropped before and after each test so that transformers talks to the current server. Subprocesses get
    ``HF_ENDPOINT``/``HF_HUB_CACHE``/``HF_TOKEN`` through the environment. Every request carries ``FAKE_TOKEN`` unless
    a call passes ``token=False``.
    """
    from huggingface_hub import constants, hf_api

    cache = str(tmp_path / "hf-hub-cache")
    with FakeHub() as hub:
        monkeypatch.setattr(constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(
            constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.endpoint + "/{repo_id}/resolve/{revision}/{filename}"
        )
        monkeypatch.setattr(hf_api.api, "endpoint", hub.endpoint)
        monkeypatch.setattr(constants, "HF_HUB_CACHE", cache)
        monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
        monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
        monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
        monkeypatch.setenv("HF_ENDPOINT", hub.endpoint)
        monkeypatch.setenv("HF_HUB_CACHE", cache)
        monkeypatch.setenv("HF_TOKEN", FAKE_TOKEN)
        _drop_transformers_hf_api()
        try:
            yield hub
        finally:
            _drop_transformers_hf_api()


def _drop_transformers_hf_api() -> None:
    """transformers keeps one HfApi, with the endpoint of the moment it was built; the next use rebuilds it."""
    hub_utils = sys.modules.get("transformers.utils.hub")
    if hub_utils is not None:
        hub_utils._hf_api = None
