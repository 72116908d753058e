"""How model names resolve (optin_hf/hub/download.py `download_model`, behind `workflow.load_model`): a user's missing
folder or unreachable Hub id is named as such from every entry point, and a name typed by someone else (the Space's
visitor, `hub_only=True`) is a Hub id only, read with the token given and never with HF_TOKEN or from the cache."""

from __future__ import annotations

from pathlib import Path

import pytest
from conftest import FAKE_TOKEN
from huggingface_hub import constants, create_repo, upload_folder
from hub_server import FakeHub
from tiny import tiny_model
from tiny_task import tokenizer

from optin_hf import AutoOptinModel
from optin_hf.commands.__main__ import main
from optin_hf.hub.download import is_hub_id
from optin_hf.tasks.workflow import load_model

PATH_SPELLINGS = ["./model", "../model", "~/model", "nested/org/model", "nested\\model", "ABSOLUTE"]


def save_text_model(folder: Path) -> Path:
    """A tiny BERT classifier with its tokenizer, as save_pretrained writes them."""
    tiny_model("bert").save_pretrained(folder)
    tokenizer().save_pretrained(folder)
    return folder


def spelled(name: str, tmp_path: Path) -> str:
    return str(tmp_path / "model") if name == "ABSOLUTE" else name


def cli_error(capsys: pytest.CaptureFixture, *argv: str) -> str:
    """The CLI's one `error:` line for `argv`, which must exit with status 1."""
    assert main(list(argv)) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "Traceback" not in err, err
    return err


@pytest.mark.parametrize("name", ["bert-base-uncased", "org/name", "data/model"])
def test_hub_ids_are_names_or_org_slash_name(name: str) -> None:
    assert is_hub_id(name)


@pytest.mark.parametrize("name", [*PATH_SPELLINGS[:-1], "/data/model", "C:\\model", ".model", "my model", "a--b", ""])
def test_no_path_spelling_is_a_hub_id(name: str) -> None:
    assert not is_hub_id(name)


@pytest.mark.parametrize("name", PATH_SPELLINGS)
def test_a_visitor_path_is_refused_on_its_spelling_alone(name: str, tmp_path: Path, monkeypatch) -> None:
    """Same refusal whether a model sits at that path or not: the disk is never asked, so nothing is read from it
    and a visitor cannot even learn which paths exist."""
    (tmp_path / "cwd").mkdir()
    monkeypatch.chdir(tmp_path / "cwd")
    messages = []
    for exists in (False, True):
        if exists:
            save_text_model(Path.cwd() / spelled(name, tmp_path))  # an absolute spelling drops the cwd
        with pytest.raises(ValueError, match=r"is not a Hub repo id \(name or org/name\): only models on the Hub load "
                                             r"here, never a path on this machine") as refused:
            load_model(spelled(name, tmp_path), hub_only=True, token=False)
        messages.append(str(refused.value))
    assert messages[0] == messages[1]


def test_a_visitor_id_never_loads_the_local_folder_of_that_name(hub_server: FakeHub, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    save_text_model(tmp_path / "org" / "model")  # "org/model" is a valid Hub id and a folder here
    assert load_model("org/model")[0].name_or_path == "org/model"  # the user's own word: their folder
    with pytest.raises(OSError, match=r"The model 'org/model' was not found on the Hub, or it is private or gated and "
                                      r"an anonymous request cannot read it \(HTTP 401\)"):
        load_model("org/model", hub_only=True, token=False)
    assert hub_server.requests == ["GET /api/models/org/model"]  # asked the Hub, nothing else


def test_a_private_repo_loads_only_with_a_token_that_reads_it(hub_server: FakeHub, tmp_path: Path) -> None:
    """HF_TOKEN is set (the hub_server fixture sets it, as a Space owner would): it opens the repo to this machine's
    own code, and the snapshot it fetched sits in the cache, yet a visitor's id never reaches either."""
    repo_id = create_repo("private-bert", private=True).repo_id
    upload_folder(repo_id=repo_id, folder_path=save_text_model(tmp_path / "model"))
    model, processor, task = load_model(repo_id)  # HF_TOKEN, implicitly: the repo loads
    assert model.name_or_path == repo_id and task == "text-classification" and processor("red")["input_ids"]
    asked = len(hub_server.requests)
    with pytest.raises(OSError, match=rf"The model '{repo_id}' was not found on the Hub, or it is private or gated and "
                                      r"an anonymous request cannot read it \(HTTP 401\)"):
        load_model(repo_id, hub_only=True, token=False)
    assert hub_server.requests[asked:] == [f"GET /api/models/{repo_id}"]  # one anonymous question, no cached answer
    assert load_model(repo_id, hub_only=True, token=FAKE_TOKEN)[0].name_or_path == repo_id  # the visitor's own token


def test_a_missing_local_folder_is_named(tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    missing = f"no such local folder: {tmp_path}/nosuch"
    with pytest.raises(FileNotFoundError, match=rf"The model './nosuch' is spelled as a path, not a Hub repo id, and "
                                                rf"there is {missing}\."):
        load_model("./nosuch")
    for command in ("prune", "evaluate"):
        assert missing in cli_error(capsys, command, "--model", "./nosuch", "--dataset", "x.csv")
    (tmp_path / "recipe.yaml").write_text("model: ./nosuch\ndataset:\n  path: x.csv\n")
    assert missing in cli_error(capsys, "recipe", str(tmp_path / "recipe.yaml"))
    with pytest.raises(FileNotFoundError, match=rf"The checkpoint '\./nosuch' is spelled as a path.*{missing}"):
        AutoOptinModel.from_pretrained("./nosuch")
    with pytest.raises(FileNotFoundError, match=r"no such local folder: .*/~/model \(~ is not expanded here"):
        load_model("~/model")


def test_an_unreachable_hub_id_is_named(hub_server: FakeHub, tmp_path: Path, monkeypatch, capsys) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "models").mkdir()
    with pytest.raises(OSError, match=rf"The model 'models/bert' is neither a local folder \(no such local folder: "
                                      rf"{tmp_path}/models/bert\) nor a model repo on the Hub"):
        load_model("models/bert")  # half a path exists here: the missing folder is named, after the Hub said no
    hub_server.stop()
    error = cli_error(capsys, "prune", "--model", "nosuch/dir", "--dataset", "x.csv")
    assert error == (
        "error: The model 'nosuch/dir' is neither a local folder nor reachable on the Hub: the Hub cannot be reached "
        "(ConnectError), and revision main is not in the local Hugging Face cache.\n"
    )
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(OSError, match=r"The model 'nosuch/dir' is neither a local folder nor reachable on the Hub: "
                                      r"downloads are off \(HF_HUB_OFFLINE=1 or local_files_only=True\)"):
        load_model("nosuch/dir")


def test_a_folder_that_is_no_model_is_named(tmp_path: Path) -> None:
    (tmp_path / "notes").mkdir()
    with pytest.raises(FileNotFoundError, match=r"notes has no config.json: it is not a transformers model"):
        load_model(str(tmp_path / "notes"))
