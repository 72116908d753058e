"""optin_hf/checkpoint.py: a save never deletes the user's files, and a kill at any step, a concurrent save or a full
disk never loses a checkpoint.

Run as a script, this file is the child process of the fault, concurrency and full-disk tests: see `CHILDREN`.
"""

from __future__ import annotations

import os
import resource
import shutil
import signal
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny import batch, calibration, output, tiny_model
from torch import nn

from optin_hf import AutoOptinModel, OptinConfig, OptinPruner, checkpoint
from optin_hf.checkpoint import OWNED_FILES, atomic_directory, is_checkpoint, restore_interrupted_save
from optin_hf.commands.__main__ import main
from optin_hf.hub import write_repo_folder

REPO = Path(__file__).resolve().parents[1]
USER_FILES = {"NOTES.md": "my notes\n", "vocab.txt": "[PAD]\nhello\n", "runs/log.txt": "epoch 1\n"}


def pruned(seed: int, mac_constraint: float) -> tuple[OptinPruner, nn.Module]:
    """A tiny pruned BERT; the same seed gives the same model in any process."""
    model = tiny_model("bert", seed=seed, attn="sdpa")
    config = OptinConfig(mac_constraint=mac_constraint, importance="random", seq_len=12, seed=seed, reconstruct="none")
    pruner = OptinPruner(config)
    pruner.prune_model(model, calibration("bert"))
    return pruner, model


OLD, NEW = (0, 0.8), (1, 0.4)


def write_user_files(folder: Path) -> None:
    for name, text in USER_FILES.items():
        (folder / name).parent.mkdir(parents=True, exist_ok=True)
        (folder / name).write_text(text)


def snapshot(folder: Path) -> dict[str, bytes]:
    """Every file under `folder` (hidden ones too) with its bytes."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def dense_user_folder(folder: Path) -> dict[str, bytes]:
    """A user's fine-tuned model folder (config, weights, tokenizer, notes); returns its snapshot."""
    tiny_model("bert").save_pretrained(folder)
    write_user_files(folder)
    return snapshot(folder)


@pytest.fixture(scope="module")
def old_and_new():
    return pruned(*OLD), pruned(*NEW)


def test_save_refuses_a_folder_that_is_not_a_checkpoint(tmp_path, old_and_new):
    (pruner, model), _ = old_and_new
    folder = tmp_path / "my-finetuned-bert"
    before = dense_user_folder(folder)
    with pytest.raises(FileExistsError, match=r"my-finetuned-bert is not empty \(NOTES.md, config.json.*overwrite=True"):
        pruner.save(model, folder)
    with pytest.raises(FileExistsError, match="is not an optin-hf checkpoint"):
        write_repo_folder(model, folder, "user/slim", masks_only=False)
    assert snapshot(folder) == before
    assert os.listdir(tmp_path) == ["my-finetuned-bert"]  # no temp folder left beside it
    (tmp_path / "a-file").write_text("x")
    with pytest.raises(NotADirectoryError, match="a-file is not an optin-hf checkpoint but a file"):
        pruner.save(model, tmp_path / "a-file")


def test_overwrite_saves_into_a_user_folder_keeping_what_optin_hf_does_not_write(tmp_path, old_and_new):
    (pruner, model), _ = old_and_new
    folder = tmp_path / "my-finetuned-bert"
    dense_user_folder(folder)
    pruner.save(model, folder, overwrite=True)
    assert torch.allclose(output(AutoOptinModel.from_pretrained(folder), batch("bert")), output(model, batch("bert")), atol=1e-5)
    assert {name: (folder / name).read_text() for name in USER_FILES} == USER_FILES
    write_repo_folder(model, tmp_path / "repo", "user/slim", masks_only=False)  # a new folder needs no consent
    dense_user_folder(tmp_path / "repo2")
    write_repo_folder(model, tmp_path / "repo2", "user/slim", masks_only=False, overwrite=True)
    assert (tmp_path / "repo2" / "README.md").read_text() == (tmp_path / "repo" / "README.md").read_text()
    assert (tmp_path / "repo2" / "NOTES.md").read_text() == USER_FILES["NOTES.md"]


def test_replacing_a_checkpoint_keeps_the_user_files_and_drops_stale_owned_ones(tmp_path, old_and_new):
    (old_pruner, old_model), (new_pruner, new_model) = old_and_new
    folder = tmp_path / "out"
    old_pruner.save(old_model, folder, max_shard_size=20_000)  # sharded: its shards must not outlive it
    assert len(list(folder.glob("model-*-of-*.safetensors"))) > 1
    write_user_files(folder)
    (folder / "optin_report.json").write_text("{}")  # an earlier CLI run's report describes the old model
    (folder / "README.md").write_text("old card")
    os.symlink("NOTES.md", folder / "notes-link")
    new_pruner.save(new_model, folder)
    assert {name: (folder / name).read_text() for name in USER_FILES} == USER_FILES
    assert os.readlink(folder / "notes-link") == "NOTES.md"
    assert not list(folder.glob("model-*-of-*.safetensors")) and (folder / "model.safetensors").is_file()
    assert not (folder / "optin_report.json").exists() and not (folder / "README.md").exists()
    loaded = AutoOptinModel.from_pretrained(folder)
    assert torch.allclose(output(loaded, batch("bert")), output(new_model, batch("bert")), atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == ["out"]


def test_owned_files_cover_everything_a_save_writes(tmp_path, old_and_new):
    import fnmatch

    (pruner, model), _ = old_and_new
    pruner.save(model, tmp_path / "full", max_shard_size=20_000)
    write_repo_folder(model, tmp_path / "repo", "user/slim", masks_only=False)
    written = set(os.listdir(tmp_path / "full")) | set(os.listdir(tmp_path / "repo"))
    assert {n for n in written if not any(fnmatch.fnmatchcase(n, p) for p in OWNED_FILES)} == set()


def test_a_symlinked_folder_is_followed_and_kept(tmp_path, old_and_new):
    (old_pruner, old_model), (new_pruner, new_model) = old_and_new
    real = tmp_path / "disk" / "out"
    old_pruner.save(old_model, real)
    (tmp_path / "work").mkdir()
    link = tmp_path / "work" / "out"
    link.symlink_to(real, target_is_directory=True)
    new_pruner.save(new_model, link)
    assert link.is_symlink() and os.readlink(link) == str(real)
    loaded = AutoOptinModel.from_pretrained(real)
    assert torch.allclose(output(loaded, batch("bert")), output(new_model, batch("bert")), atol=1e-5)
    assert os.listdir(tmp_path / "work") == ["out"] and os.listdir(tmp_path / "disk") == ["out"]


def test_leftovers_of_killed_saves_are_restored_or_deleted(tmp_path, old_and_new):
    (old_pruner, old_model), (new_pruner, new_model) = old_and_new
    folder = tmp_path / "out"
    old_pruner.save(old_model, tmp_path / "staged")
    # Killed between the two renames: the old checkpoint hidden, the new one staged, the path missing.
    os.replace(tmp_path / "staged", tmp_path / ".out.old-dead0001")
    (tmp_path / ".out.tmp-dead0002").mkdir()
    (tmp_path / ".out.tmp-dead0002" / "optin_masks.safetensors").write_bytes(b"half")
    loaded = AutoOptinModel.from_pretrained(folder)  # a load puts the old checkpoint back
    assert torch.allclose(output(loaded, batch("bert")), output(old_model, batch("bert")), atol=1e-5)
    assert sorted(os.listdir(tmp_path)) == [".out.tmp-dead0002", "out"]
    (tmp_path / ".out.old-dead0003").mkdir()  # killed while deleting the replaced folder
    new_pruner.save(new_model, folder)
    assert os.listdir(tmp_path) == ["out"]
    # The same recovery when a save, not a load, comes first.
    os.replace(folder, tmp_path / ".out.old-dead0004")
    old_pruner.save(old_model, folder)
    assert os.listdir(tmp_path) == ["out"]
    assert torch.allclose(output(AutoOptinModel.from_pretrained(folder), batch("bert")), output(old_model, batch("bert")), atol=1e-5)


def test_atomic_directory_stays_a_plain_replace(tmp_path):
    """The primitive the trained-model cache uses: no checkpoint guard, the folder replaced as a whole."""
    folder = tmp_path / "cache"
    folder.mkdir()
    (folder / "junk").write_text("x")
    with atomic_directory(folder) as tmp:
        (tmp / "model.bin").write_text("y")
    assert os.listdir(folder) == ["model.bin"] and os.listdir(tmp_path) == ["cache"]
    with pytest.raises(RuntimeError), atomic_directory(folder) as tmp:
        (tmp / "half").write_text("z")
        raise RuntimeError
    assert os.listdir(folder) == ["model.bin"] and os.listdir(tmp_path) == ["cache"]


def test_cli_refuses_a_foreign_output_and_offers_overwrite(tmp_path, capsys):
    folder = tmp_path / "mine"
    before = dense_user_folder(folder)
    args = ["prune", "--model", "m", "--dataset", "d.csv", "--output", str(folder)]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and "is not an optin-hf checkpoint" in err and "--overwrite" in err
    assert snapshot(folder) == before


@pytest.mark.parametrize("output", ["/", "FILE/out"])
def test_cli_refuses_an_output_it_cannot_save_before_the_run(tmp_path, capsys, output):
    (tmp_path / "FILE").write_text("x")
    output = output.replace("FILE", str(tmp_path / "FILE"))
    assert main(["prune", "--model", "m", "--dataset", "d.csv", "--output", output, "--overwrite"]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err in (
        "error: / is the root of the file system: a save replaces its folder by renaming a new one into place, which "
        "the root cannot be. Save into a folder below it.",
        f"error: Cannot save into {tmp_path / 'FILE' / 'out'}: {tmp_path / 'FILE'} is a file, not a folder.",
    )


def test_cli_rerun_keeps_the_user_files_in_its_output(tmp_path, capsys, monkeypatch):
    from tiny_task import trained_text_model, write_csv

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained_text_model(tmp_path / "model", steps=1)
    write_csv(tmp_path / "data.csv", n=24, label_names=True)
    out = tmp_path / "out"
    args = [
        "prune", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.csv"), "--output", str(out),
        "--calibration-split", "train[:8]", "--eval-split", "train[8:]", "--num-samples", "4",
        "--importance", "magnitude", "--reconstruct", "none",
    ]  # fmt: skip
    dense_user_folder(out)
    assert main([*args, "--overwrite"]) == 0
    (out / "MORE.md").write_text("more")
    assert main([*args, "--mac-constraint", "0.4"]) == 0  # replaces the checkpoint, no --overwrite needed
    assert (out / "MORE.md").read_text() == "more"
    assert {name: (out / name).read_text() for name in USER_FILES if name != "vocab.txt"} == {
        k: v for k, v in USER_FILES.items() if k != "vocab.txt"
    }
    assert OptinConfig.from_pretrained(out).mac_constraint == 0.4 and (out / "optin_report.json").is_file()
    assert (out / "tokenizer_config.json").is_file()  # the run's tokenizer, written beside the checkpoint


def test_cli_saves_into_the_current_folder(tmp_path, capsys, monkeypatch):
    from tiny_task import trained_text_model, write_csv

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    trained_text_model(tmp_path / "model", steps=1)
    write_csv(tmp_path / "data.csv", n=24, label_names=True)
    here = tmp_path / "here"
    dense_user_folder(here)
    monkeypatch.chdir(here)
    args = [
        "prune", "--model", str(tmp_path / "model"), "--dataset", str(tmp_path / "data.csv"), "--output", ".",
        "--calibration-split", "train[:8]", "--eval-split", "train[8:]", "--num-samples", "4",
        "--importance", "magnitude", "--reconstruct", "none", "--overwrite",
    ]  # fmt: skip
    assert main(args) == 0, capsys.readouterr().err
    assert Path.cwd() == here and is_checkpoint(here) and (here / "optin_report.json").is_file()
    assert (here / "tokenizer_config.json").is_file() and (here / "NOTES.md").read_text() == USER_FILES["NOTES.md"]
    assert sorted(os.listdir(tmp_path)) == ["data.csv", "here", "model"]


# The fault test. A child process (this file run as a script) forks one grandchild per step k; the grandchild
# saves the NEW model over the target and SIGKILLs itself just before its k-th file-system change (seen through
# an audit hook: every mkdir, rename, link, delete and file opened for writing). After each kill the parent
# checks the target, resets it and lets the child go on, until a save runs to the end. The single deletes
# (os.remove, os.rmdir) are left out: they only come from deleting the replaced folder once the new one is in
# place, where the kill before shutil.rmtree stands for them.

MUTATIONS = {"os.mkdir", "os.rename", "os.link", "os.symlink", "shutil.rmtree", "shutil.copyfile", "shutil.copytree"}
WRITE_FLAGS = os.O_WRONLY | os.O_RDWR | os.O_CREAT


def child_process(*args: str, stderr=subprocess.PIPE) -> subprocess.Popen:
    """This file run as a script (`CHILDREN[args[0]](*args[1:])`), on one thread, talking on stdin and stdout."""
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    return subprocess.Popen(
        [sys.executable, __file__, *args], stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=stderr, text=True,
        env=env, cwd=Path(__file__).parent,
    )


def _kill_at(step: int):
    seen = 0

    def hook(event: str, args: tuple) -> None:
        nonlocal seen
        if event in MUTATIONS or (event == "open" and isinstance(args[2], int) and args[2] & WRITE_FLAGS):
            seen += 1
            if seen == step:
                os.write(1, f"killed {step} {event} {Path(str(args[0])).name}\n".encode())
                os.kill(os.getpid(), signal.SIGKILL)

    return hook


def _serve() -> None:
    """The child: for each "TARGET OVERWRITE" line on stdin, kill a save at every step k = 1, 2, ... in turn."""
    torch.set_num_threads(1)  # forking with a thread pool running is unsafe
    pruner, model = pruned(*NEW)
    for line in sys.stdin:
        target, overwrite = line.split()
        for step in range(1, 1000):
            pid = os.fork()
            if pid == 0:
                sys.addaudithook(_kill_at(step))
                pruner.save(model, target, overwrite=overwrite == "1")
                os._exit(0)
            _, status = os.waitpid(pid, 0)
            if not os.WIFSIGNALED(status):
                print(f"done {step} {os.waitstatus_to_exitcode(status)}", flush=True)
                break
            sys.stdin.readline()  # the parent has checked and reset the target


def test_kill_at_every_step_of_a_save_loses_nothing(tmp_path, old_and_new):
    (old_pruner, old_model), (_, new_model) = old_and_new
    inputs = batch("bert")
    old_out, new_out = output(old_model, inputs), output(new_model, inputs)
    assert not torch.allclose(old_out, new_out, atol=1e-2)
    pristine_checkpoint = tmp_path / "pristine-checkpoint"
    old_pruner.save(old_model, pristine_checkpoint)
    write_user_files(pristine_checkpoint)
    pristine_user = tmp_path / "pristine-user"
    dense_user_folder(pristine_user)
    work = tmp_path / "work"

    stderr = open(tmp_path / "child.err", "w")
    child = child_process("serve", stderr=stderr)

    def loads_as(*expected: torch.Tensor) -> bool:
        got = output(AutoOptinModel.from_pretrained(work / "out"), inputs)
        return any(torch.allclose(got, e, atol=1e-5) for e in expected)

    killed_at: list[str] = []
    try:
        for pristine, overwrite in ((pristine_checkpoint, "0"), (pristine_user, "1")):
            before = snapshot(pristine)
            shutil.rmtree(work, ignore_errors=True)
            shutil.copytree(pristine, work / "out", symlinks=True)
            child.stdin.write(f"{work / 'out'} {overwrite}\n")
            child.stdin.flush()
            while True:
                line = child.stdout.readline()
                assert line, f"the child died: {(tmp_path / 'child.err').read_text()[-3000:]}"
                if overwrite == "0":  # replacing a checkpoint: it loads as the old or the new one
                    assert loads_as(old_out, new_out), line
                else:  # a user's folder: untouched (once the next load or save has restored it), or the new checkpoint
                    restore_interrupted_save(work / "out")
                    assert snapshot(work / "out") == before or loads_as(new_out), line
                assert {n: (work / "out" / n).read_text() for n in USER_FILES} == USER_FILES, line
                if line.startswith("done"):
                    assert line.split()[2] == "0" and loads_as(new_out)
                    break
                killed_at.append(line.split()[2])
                shutil.rmtree(work)
                shutil.copytree(pristine, work / "out", symlinks=True)
                child.stdin.write("\n")
                child.stdin.flush()
    finally:
        child.kill()
        child.wait()
        stderr.close()
    # Every kind of step was hit, the window between the two renames included.
    assert {"os.mkdir", "open", "os.link", "shutil.copytree", "shutil.rmtree"} <= set(killed_at), killed_at
    assert killed_at.count("os.rename") == 4, killed_at


def _save_loop(target: str, seed: str, mac_constraint: str, times: str) -> None:
    """The concurrency test's child: prune, say "ready", and on "go" save into `target` `times` times."""
    torch.set_num_threads(1)
    pruner, model = pruned(int(seed), float(mac_constraint))
    print("ready", flush=True)
    sys.stdin.readline()
    for _ in range(int(times)):
        pruner.save(model, target)


def test_two_processes_saving_into_one_folder_keep_a_checkpoint_and_the_user_files(tmp_path, old_and_new):
    (old_pruner, old_model), (_, new_model) = old_and_new
    folder = tmp_path / "out"
    old_pruner.save(old_model, folder)
    (folder / "NOTES.md").write_text(USER_FILES["NOTES.md"])
    children = [child_process("save-loop", str(folder), *map(str, settings), "12") for settings in (OLD, NEW)]
    try:
        for child in children:  # both ready, then both go: their saves overlap
            assert child.stdout.readline() == "ready\n", child.communicate()[1][-3000:]
        for child in children:
            child.stdin.write("go\n")
            child.stdin.flush()
        for child in children:
            _, err = child.communicate(timeout=120)
            assert child.returncode == 0, err[-3000:]
    finally:
        for child in children:
            child.kill()
            child.wait()
    assert (folder / "NOTES.md").read_text() == USER_FILES["NOTES.md"]
    got = output(AutoOptinModel.from_pretrained(folder), batch("bert"))  # one of the two complete checkpoints
    assert any(torch.allclose(got, output(m, batch("bert")), atol=1e-5) for m in (old_model, new_model))
    assert os.listdir(tmp_path) == ["out"]  # no temp folder, no lock file left beside it


def test_a_save_waits_for_another_save_into_the_same_folder_then_gives_up_naming_it(tmp_path, old_and_new, monkeypatch):
    (pruner, model), _ = old_and_new
    folder = tmp_path / "out"
    pruner.save(model, folder)
    monkeypatch.setattr(checkpoint, "LOCK_TIMEOUT_S", 0.3)
    with checkpoint.save_lock(folder):  # another save, as far as the lock can tell
        with pytest.warns(UserWarning, match=r"Waiting for another save into .*out to finish"), pytest.raises(
            TimeoutError, match=rf"Another save into {folder} has held .*\.out\.lock for over 0 s: let it finish"
        ):
            pruner.save(model, folder)
    assert sorted(os.listdir(tmp_path)) == ["out"] and is_checkpoint(folder)


def test_saving_into_the_current_folder_keeps_temp_folders_beside_it(tmp_path, old_and_new, monkeypatch):
    (old_pruner, old_model), (new_pruner, new_model) = old_and_new
    here = tmp_path / "here"
    here.mkdir()
    monkeypatch.chdir(here)
    old_pruner.save(old_model, ".")  # an empty folder, not "not empty" because of its own temp folder
    write_user_files(here)
    new_pruner.save(new_model, ".")
    assert Path.cwd() == here and sorted(os.listdir(".")) == sorted(os.listdir(here))  # still in it, the new one
    assert torch.allclose(output(AutoOptinModel.from_pretrained("."), batch("bert")), output(new_model, batch("bert")), atol=1e-5)
    assert {name: Path(name).read_text() for name in USER_FILES} == USER_FILES
    shutil.rmtree(here / "runs")
    dense_user_folder(here / "sub")
    monkeypatch.chdir(here / "sub")
    old_pruner.save(old_model, ".", overwrite=True)  # was "Device or resource busy"
    assert Path.cwd() == here / "sub" and is_checkpoint(".") and Path("NOTES.md").read_text() == USER_FILES["NOTES.md"]
    assert os.listdir(tmp_path) == ["here"] and not [name for name in os.listdir(here) if name.startswith(".")]
    with pytest.raises(ValueError, match=r"^/ is the root of the file system: .* Save into a folder below it"):
        old_pruner.save(old_model, "/")


def _full_disk(target: str, max_file_size: str) -> None:
    """The full-disk test's child: save into `target` with files limited to `max_file_size` bytes (`ulimit -f`, which
    makes the OS refuse a longer write as a full disk would, with no root and no real disk to fill)."""
    torch.set_num_threads(1)
    pruner, model = pruned(*NEW)
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # the write fails with EFBIG instead of killing the process
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(max_file_size), resource.getrlimit(resource.RLIMIT_FSIZE)[1]))
    try:
        pruner.save(model, target)
    except Exception as err:  # what a caller (the CLI) gets
        print(f"{type(err).__name__}: {err}")


def test_a_save_the_disk_cannot_hold_is_one_os_error_and_loses_nothing(tmp_path, old_and_new):
    (old_pruner, old_model), _ = old_and_new
    folder = tmp_path / "out"
    old_pruner.save(old_model, folder)
    write_user_files(folder)
    before = snapshot(folder)
    child = child_process("full-disk", str(folder), "20000")  # the configs and masks fit, the weights do not
    out, err = child.communicate(timeout=120)
    assert out == (
        f"OSError: Could not save {folder}: a file would grow past the largest size allowed (the file system's, or "
        f"the process's `ulimit -f`). The save was undone: {folder} is as it was. Raise the limit, or save to "
        "another file system, and save again.\n"
    ), err[-3000:]
    assert snapshot(folder) == before and os.listdir(tmp_path) == ["out"]  # the temp folder is gone
    assert torch.allclose(output(AutoOptinModel.from_pretrained(folder), batch("bert")), output(old_model, batch("bert")), atol=1e-5)


def test_an_output_through_a_symlink_loop_is_one_error_line_before_the_run(tmp_path, capsys):
    (tmp_path / "a").symlink_to(tmp_path / "b")
    (tmp_path / "b").symlink_to(tmp_path / "a")
    for output in (tmp_path / "a", tmp_path / "a" / "out"):
        assert main(["prune", "--model", "m", "--dataset", "d.csv", "--output", str(output)]) == 1  # was a RuntimeError traceback
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith(f"error: Cannot save into {output}: its path runs into a symlink loop")


def test_weights_of_an_integer_dtype_are_refused_naming_the_tensor(tmp_path, old_and_new):
    from safetensors.torch import load_file, save_file

    pruner, model = old_and_new[0]
    pruner.save(model, tmp_path / "ckpt")
    weights = load_file(tmp_path / "ckpt" / "model.safetensors")
    key = next(k for k in weights if k.endswith("query.weight"))
    save_file({**weights, key: weights[key].long()}, tmp_path / "ckpt" / "model.safetensors")
    with pytest.raises(ValueError, match=rf"do not fit the model in dtype: {key} is torch.int64 in the weights, torch.float32 in the model"):
        AutoOptinModel.from_pretrained(tmp_path / "ckpt")  # was a RuntimeError from load_state_dict


@pytest.mark.parametrize(
    "edit, message",
    [
        (lambda values: [values], r"config.json of .* is a JSON list, not a mapping"),
        (lambda values: {**values, "num_attention_heads": "4"}, r"config.json of .* is invalid: .*num_attention_heads"),
    ],
)
def test_a_broken_config_json_is_one_value_error_naming_it(tmp_path, old_and_new, edit, message):
    import json

    pruner, model = old_and_new[0]
    pruner.save(model, tmp_path / "ckpt")
    path = tmp_path / "ckpt" / "config.json"
    path.write_text(json.dumps(edit(json.loads(path.read_text()))))
    with pytest.raises(ValueError, match=message):  # was AttributeError / huggingface_hub's StrictDataclassFieldValidationError
        AutoOptinModel.from_pretrained(tmp_path / "ckpt")


CHILDREN = {"serve": _serve, "save-loop": _save_loop, "full-disk": _full_disk}

if __name__ == "__main__":
    CHILDREN[sys.argv[1]](*sys.argv[2:])
