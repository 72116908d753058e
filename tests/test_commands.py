"""The CLI: `optimum-cli optin ...` through optimum's real entry point, and `python -m optin_hf ...`."""

import dataclasses
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
import yaml
from tiny_task import sentences, stand_in_defaults, trained_text_model, write_csv
from transformers import AutoTokenizer

from optin_hf import AutoOptinModel, OptinConfig, count_macs
from optin_hf.commands import jobs as commands_jobs
from optin_hf.commands.__main__ import main
from optin_hf.commands.args import build_parser
from optin_hf.criteria import CRITERIA, register_criterion
from optin_hf.result import pruning_result
from optin_hf.tasks import recipes as recipes_module
from optin_hf.tasks.recipes import DEFAULT_RECIPES

REPO = Path(__file__).resolve().parents[1]


def cli_env() -> dict[str, str]:
    """The repo on PYTHONPATH, which is all optimum needs to find optimum/commands/register/ (PEP 420)."""
    env = dict(os.environ, HF_HUB_OFFLINE="1", OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    env.pop("HF_TOKEN", None)
    return env


def optimum_cli(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess:
    script = Path(sys.executable).with_name("optimum-cli")
    command = [str(script)] if script.exists() else [sys.executable, "-m", "optimum.commands.optimum_cli"]
    return subprocess.run([*command, *args], capture_output=True, text=True, env=cli_env(), cwd=cwd, timeout=600)


def python_m(*args: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "optin_hf", *args], capture_output=True, text=True, env=cli_env(), timeout=600)


@pytest.fixture(scope="module")
def workspace(tmp_path_factory):
    """A trained tiny BERT with its tokenizer, and a csv whose labels are class names."""
    root = tmp_path_factory.mktemp("cli")
    trained_text_model(root / "model")
    write_csv(root / "data.csv", n=72, label_names=True)
    return root


@pytest.fixture(scope="module")
def pruned_by_optimum_cli(workspace):
    result = optimum_cli(
        "optin", "prune", "--model", str(workspace / "model"), "--dataset", str(workspace / "data.csv"),
        "--calibration-split", "train[:32]", "--eval-split", "train[32:]", "--num-samples", "16",
        "--mac-constraint", "0.5", "--importance", "magnitude", "--output", str(workspace / "out"),
    )  # fmt: skip
    return workspace / "out", result


def test_optimum_cli_prune_writes_a_loadable_slim_model_and_report(workspace, pruned_by_optimum_cli):
    out, result = pruned_by_optimum_cli
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Traceback" not in result.stderr and "pruned vs dense" in result.stdout
    config = OptinConfig.from_pretrained(out)
    assert (config.mac_constraint, config.importance, config.num_samples) == (0.5, "magnitude", 16)
    assert config.base_model_name_or_path == str(workspace / "model")
    slim = AutoOptinModel.from_pretrained(out)
    report = json.loads((out / "optin_report.json").read_text())
    dense_macs = report["stats"]["dense"]["macs"]
    assert count_macs(slim, report["seq_len"]) / dense_macs == pytest.approx(0.5, abs=0.01)
    # The reported accuracy is the saved model's, on the csv's rows 32..71 with names mapped to ids.
    tokenizer = AutoTokenizer.from_pretrained(out)
    rows = sentences(72, seed=0)[32:]
    with torch.no_grad():
        logits = slim(**tokenizer([t for t, _ in rows], padding=True, return_tensors="pt")).logits
    accuracy = float((logits.argmax(-1) == torch.tensor([y for _, y in rows])).float().mean())
    assert report["stats"]["pruned"]["metrics"]["accuracy"] == pytest.approx(accuracy)
    assert report["eval_samples"] == 40 and (out / "optin_report.png").is_file()


def test_evaluate_reuses_the_data_and_metric_recorded_by_prune(pruned_by_optimum_cli, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    out, _ = pruned_by_optimum_cli
    assert main(["evaluate", "--model", str(out)]) == 0
    printed = capsys.readouterr().out
    accuracy = json.loads((out / "optin_report.json").read_text())["stats"]["pruned"]["metrics"]["accuracy"]
    assert f"accuracy (x100)       {100 * accuracy:.2f}" in printed and "accuracy on 40 examples" in printed
    report = json.loads((out / "optin_report.json").read_text())
    (tmp_path / "copy").mkdir()
    for file in out.iterdir():
        (tmp_path / "copy" / file.name).write_bytes(file.read_bytes())
    (tmp_path / "copy" / "optin_report.json").write_text(json.dumps({**report, "metric": "glue/sst2"}))
    assert main(["evaluate", "--model", str(tmp_path / "copy")]) == 0
    assert "glue/sst2 on 40 examples" in capsys.readouterr().out  # the pruning run's metric, unless --metric


@pytest.mark.parametrize("command", [[], ["prune"], ["evaluate"], ["recipe"], ["export", "onnx"]])
def test_every_command_has_help(command):
    result = optimum_cli("optin", *command, "--help")
    assert result.returncode == 0 and result.stdout.startswith("usage: optimum-cli optin")
    expected = {(): "{prune,evaluate,recipe,export}", ("prune",): "--mac-constraint", ("evaluate",): "--model",
                ("recipe",): "RECIPE.yaml", ("export", "onnx"): "--atol"}
    assert expected[tuple(command)] in result.stdout
    mirrored = python_m(*command, "--help")
    assert mirrored.returncode == 0 and expected[tuple(command)] in mirrored.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["prune", "--mac-constraint", "abc"],
        ["prune", "--task", "translation"],
        ["evaluate"],
        ["frobnicate"],
        ["prune", "--mac-constraint", "1.5"],  # reaches OptinConfig: an error of ours, not argparse's
    ],
)
def test_invalid_arguments_give_one_line_and_nonzero_exit(args):
    result = optimum_cli("optin", *args)
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and "error:" in lines[0], result.stderr


@pytest.mark.parametrize(
    "args, message",
    [
        (["prune", "--model", "m"], "needs calibration data"),
        (["prune", "--model", "{model}", "--dataset", "missing.csv"], "missing.csv does not exist"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--eval-split", "test"], "Unknown split"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--importance", "fisherman"], "importance='fisherman' is unknown"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--metric", "glue/stsb"], "does not fit a model with 3 label"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--metric", "glue/mrpc"],
         "glue/mrpc scores the binary F1 of class 1, which needs a model with 2 labels, and this one has num_labels=3"),
        (["evaluate", "--model", "{model}", "--dataset", "{data}", "--metric", "glue/qqp"], "needs a model with 2 labels"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--checkpoint-dir", ""], "checkpoint_dir='' is an empty path"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--output", ""], "output='' is an empty path"),
        (["prune", "--model", "", "--dataset", "{data}"], "model='' is empty"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--output", "{data}"], "is not an optin-hf checkpoint"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--device", "cuda:7"], "cuda"),
        (["prune", "--text-column", "x"], "--text-column needs --dataset"),
        (["prune", "--model", "{model}", "--dataset", "{data}", "--full"], "--full only applies with --push-to-hub"),
        (["evaluate", "--model", "{model}"], "has no optin_report.json"),
        (["recipe", "missing.yaml"], "missing.yaml does not exist"),
    ],
)
def test_bad_values_give_one_error_line(workspace, capsys, monkeypatch, args, message):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.chdir(workspace)
    args = [a.format(model=workspace / "model", data=workspace / "data.csv") for a in args]
    assert main(args) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: ") and message in err


def test_prune_without_model_prunes_the_embedded_text_default(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    monkeypatch.setitem(sys.modules, "optin_hf.tasks.defaults", stand_in_defaults(workspace / "model", calls))
    assert main(["prune", "--importance", "random", "--num-samples", "8", "--output", str(tmp_path / "out")]) == 0
    assert calls == ["bbc-news"]
    assert OptinConfig.from_pretrained(tmp_path / "out").mac_constraint == 0.6
    assert "bbc-news (embedded default)" in capsys.readouterr().out
    report = json.loads((tmp_path / "out" / "optin_report.json").read_text())
    assert report["data"] == {"default": "bbc-news"} and report["eval_samples"] == 32
    assert main(["evaluate", "--model", str(tmp_path / "out")]) == 0 and calls == ["bbc-news", "bbc-news"]
    assert main(["prune", "--default", "cifar"]) == 1
    assert "Unknown embedded default 'cifar'" in capsys.readouterr().err


@pytest.mark.parametrize("full", [False, True])
def test_push_to_hub_hands_the_pruned_model_and_scores_to_the_hub_module(workspace, tmp_path, monkeypatch, full):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    calls = []
    hub = types.ModuleType("optin_hf.hub")
    hub.push_to_hub = lambda model, repo_id, *, scores, masks_only: calls.append(
        (pruning_result(model).masks, model.config.optin, repo_id, masks_only, scores)
    )
    monkeypatch.setitem(sys.modules, "optin_hf.hub", hub)
    args = ["prune", "--model", str(workspace / "model"), "--dataset", str(workspace / "data.csv"), "--calibration-split", "train[:8]",
            "--eval-split", "train[8:16]", "--importance", "random", "--output", str(tmp_path / "out"), "--push-to-hub", "me/tiny"]
    assert main(args + (["--full"] if full else [])) == 0
    [(masks, optin, repo_id, masks_only, scores)] = calls
    assert repo_id == "me/tiny" and masks_only is not full and scores.head_scores.shape == masks.head_mask.shape
    assert optin["heads_per_layer"] == masks.heads_per_layer()


def test_register_file_is_a_namespace_portion():
    assert (REPO / "optimum/commands/register/register_optin.py").is_file()
    assert not list((REPO / "optimum").rglob("__init__.py"))  # PEP 420: an __init__.py would shadow optimum itself


@pytest.mark.parametrize(
    "text, message",
    [
        ("[1, 2]", "it holds a JSON list, not an object"),
        ('"accuracy"', "it holds a JSON str, not an object"),
        ("{", "Expecting property name"),
        ('{"data": ["x"]}', "its data is ['x'], not a mapping"),
        ('{"data": {"dataset": {"path": 5}}}', "path=5 is an int; expected a string"),
        ('{"data": {"dataset": {"path": "d", "streaming": "no"}}}', "streaming='no' is a str; expected a bool"),
        ('{"data": {"dataset": ["d"]}}', "dataset=['d'] is a list; expected a DataSpec or None"),
        ('{"data": {"default": 3}}', "default=3 is an int; expected a string or None"),
        ('{"data": {"default": "bbc-news"}, "metric": 5}', "metric=5 is an int; expected a string or None"),
        ('{"data": {"default": "bbc-news"}, "metric": "f2"}', "metric='f2' is unknown"),
    ],
)
def test_evaluate_refuses_a_report_it_cannot_read(workspace, tmp_path, capsys, monkeypatch, text, message):
    """optin_report.json may be hand-edited or foreign: one error line naming the file, never a traceback."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    folder.mkdir()
    for file in (workspace / "model").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "optin_report.json").write_text(text)
    assert main(["evaluate", "--model", str(folder)]) == 1
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith(f"error: {folder / 'optin_report.json'} is not a report optin-hf can read (") and message in err


def test_evaluate_given_data_and_metric_does_not_read_the_report(workspace, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    folder = tmp_path / "model"
    folder.mkdir()
    for file in (workspace / "model").iterdir():
        (folder / file.name).write_bytes(file.read_bytes())
    (folder / "optin_report.json").write_text("[1, 2]")
    args = ["evaluate", "--model", str(folder), "--dataset", str(workspace / "data.csv"), "--eval-split", "train[:8]", "--metric", "accuracy"]
    assert main(args) == 0 and "accuracy on 8 examples" in capsys.readouterr().out


def test_prune_resumes_from_its_checkpoint_dir(workspace, tmp_path, capsys, monkeypatch):
    """--checkpoint-dir reaches OptinConfig.checkpoint_dir: a second run with the same folder reuses every saved
    raw loss (in two steps, each step's own) and computes none, and gives the same masks."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    checkpoint = tmp_path / "losses"
    args = ["prune", "--model", str(workspace / "model"), "--dataset", str(workspace / "data.csv"), "--calibration-split",
            "train[:8]", "--eval-split", "train[8:16]", "--num-samples", "8", "--neuron-group-size", "16", "--reconstruct-samples", "8",
            "--prune-steps", "2", "--checkpoint-dir", str(checkpoint), "--importance", "optin"]
    assert main([*args, "--output", str(tmp_path / "first")]) == 0
    assert OptinConfig.from_pretrained(tmp_path / "first").checkpoint_dir == str(checkpoint)
    saved = sorted(checkpoint.rglob("raw_losses.*.safetensors"))
    assert [p.parent.name for p in saved] == ["step1", "step2"]
    written = {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved}
    assert main([*args, "--output", str(tmp_path / "second")]) == 0
    assert {p: (p.stat().st_mtime_ns, p.read_bytes()) for p in saved} == written  # nothing was scored again
    first, second = (pruning_result(AutoOptinModel.from_pretrained(tmp_path / name)).masks for name in ("first", "second"))
    assert torch.equal(first.head_mask, second.head_mask) and torch.equal(first.neuron_mask, second.neuron_mask)


def test_evaluate_truncates_texts_at_the_model_positions(workspace, tmp_path, capsys, monkeypatch):
    """Evaluation rows longer than the model's positions (64 here, below the default max_length of 128) are
    measured at what the model holds instead of failing inside transformers."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    long_rows = [(" ".join([text] * 12), label) for text, label in sentences(8, seed=3)]
    data = tmp_path / "long.csv"
    data.write_text("text,label\n" + "".join(f"{text},{label}\n" for text, label in long_rows))
    assert len(AutoTokenizer.from_pretrained(workspace / "model")(long_rows[0][0])["input_ids"]) > 128
    args = ["evaluate", "--model", str(workspace / "model"), "--dataset", str(data), "--eval-split", "train", "--metric", "accuracy"]
    assert main(args) == 0 and "accuracy on 8 examples" in capsys.readouterr().out


@pytest.mark.parametrize("device", ["meta", "mps", "xpu"])
def test_a_device_that_cannot_run_a_model_is_one_error_line_before_loading(tmp_path, capsys, device):
    if device == "mps" and torch.backends.mps.is_available():
        pytest.skip("this machine has Metal")
    args = ["prune", "--model", str(tmp_path / "nosuch"), "--dataset", "d.csv", "--device", device, "--output", str(tmp_path / "out")]
    assert main(args) == 1  # was NotImplementedError "Cannot copy out of meta tensor" / RuntimeError tracebacks
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: Device {device!r} cannot run a model here: use cpu or cuda (mps on a Mac with Metal)."]


@pytest.mark.parametrize("max_length", ["0", "-3"])
def test_evaluate_refuses_a_max_length_below_one(tmp_path, capsys, max_length):
    # -3 was an OverflowError traceback from the tokenizer; 0 was read as "not given"
    assert main(["evaluate", "--model", str(tmp_path / "nosuch"), "--max-length", max_length]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert err == [f"error: max_length={max_length} must be a positive integer (or left out: the pruning run's)."]


@pytest.fixture
def built_jobs(monkeypatch, tmp_path) -> list:
    """The jobs the CLI builds, recorded instead of run (relative output folders land in tmp_path)."""
    built = []
    monkeypatch.setattr(commands_jobs, "_finish", built.append)
    monkeypatch.chdir(tmp_path)
    return built


@pytest.mark.parametrize(
    "flags, name", [([], "bbc-news"), *((["--default", name], name) for name in DEFAULT_RECIPES)], ids=["no-default", *DEFAULT_RECIPES]
)
def test_prune_with_a_default_builds_the_job_of_its_recipe(built_jobs, flags, name):
    """`prune --default NAME` runs NAME's recipe: its settings have one source, the file under recipes/.
    (The tweets' max_length 64 and the ResNet's neurons_multiple_of 1 were lost to a second copy in the CLI.)"""
    assert main(["prune", *flags]) == 0
    assert main(["recipe", str(REPO / "recipes" / DEFAULT_RECIPES[name])]) == 0
    by_flags, by_recipe = built_jobs
    assert (by_flags.optin, by_flags.default, by_flags.output) == (by_recipe.optin, by_recipe.default, by_recipe.output)


def test_prune_reads_a_defaults_recipe_file_and_each_flag_given_replaces_one_setting(built_jobs, tmp_path, monkeypatch):
    recipe = yaml.safe_load((REPO / "recipes" / DEFAULT_RECIPES["digits-vit"]).read_text())
    recipe["optin"].update(num_samples=5, seed=7, faithful=True, neurons_multiple_of=2)
    (tmp_path / "edited").mkdir()
    (tmp_path / "edited" / DEFAULT_RECIPES["digits-vit"]).write_text(yaml.safe_dump(recipe))
    monkeypatch.setattr(recipes_module, "RECIPES_DIR", tmp_path / "edited")
    assert main(["prune", "--default", "digits-vit"]) == 0
    # Flags equal to OptinConfig's defaults still replace the recipe's values: given is given.
    assert main(["prune", "--default", "digits-vit", "--seed", "0", "--no-faithful", "--num-samples", "9"]) == 0
    assert main(["prune", "--default", "digits-vit", "--max-scoring-time", "1m"]) == 0  # the budget sizes the run
    edited, flagged, budgeted = (job.optin for job in built_jobs)
    assert (edited.num_samples, edited.seed, edited.faithful, edited.neurons_multiple_of) == (5, 7, True, 2)
    assert (flagged.num_samples, flagged.seed, flagged.faithful, flagged.neurons_multiple_of) == (9, 0, False, 2)
    assert (budgeted.num_samples, budgeted.neuron_group_size, budgeted.seed) == (OptinConfig.num_samples, OptinConfig.neuron_group_size, 7)


def test_every_optin_flag_is_unset_unless_given():
    """A flag with a value of its own when not given would override every default's recipe silently."""
    args = build_parser("optin-hf").parse_args(["prune"])
    flags = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptinConfig) if hasattr(args, f.name)}
    assert {"mac_constraint", "num_samples", "max_length", "seed"} <= set(flags)
    assert {name: value for name, value in flags.items() if value is not None} == {}


def test_a_repair_flag_drops_the_recipe_settings_that_need_the_refit_and_keeps_the_flags_given():
    """digits-resnet's recipe refits with its readers and counts by the refit in two rounds: `--reconstruct batchnorm`
    takes them away with the refit (each would be refused with it), while a flag given for one of them is kept."""
    parser = build_parser("optin-hf")

    def config(*flags: str) -> OptinConfig:
        return commands_jobs.optin_config(parser.parse_args(["prune", "--default", "digits-resnet", *flags]))

    recipe = config()
    assert (recipe.reconstruct, recipe.reconstruct_readers, recipe.allocation, recipe.allocation_rounds) == ("weights", True, "refit", 2)
    plain = config("--reconstruct", "batchnorm")
    assert (plain.reconstruct, plain.reconstruct_readers, plain.allocation, plain.allocation_rounds) == ("batchnorm", False, "scores", 1)
    assert dataclasses.replace(plain, reconstruct="weights", reconstruct_readers=True, allocation="refit", allocation_rounds=2) == recipe
    scored = config("--allocation", "scores")  # the refit stays, the rounds of the refit allocation go
    assert (scored.reconstruct, scored.reconstruct_readers, scored.allocation_rounds) == ("weights", True, 1)
    assert not config("--no-reconstruct-readers").reconstruct_readers
    with pytest.raises(ValueError, match="allocation='refit' counts units by the loss left after the refit"):
        config("--reconstruct", "batchnorm", "--allocation", "refit")
    args = parser.parse_args(["prune", "--model", "m", "--dataset", "d.csv", "--reconstruct-inputs"])
    assert commands_jobs.optin_config(args).reconstruct_inputs


def test_a_repair_flag_keeps_an_allocation_that_needs_no_refit():
    """The LLM default counts its MLP channels by FLAP's fluctuation, which needs no refit: `--reconstruct none`
    takes the refit's unit choice and input refit away and keeps that allocation."""
    args = build_parser("optin-hf").parse_args(["prune", "--default", "shakespeare-smollm2", "--reconstruct", "none"])
    config = commands_jobs.optin_config(args)
    assert (config.reconstruct, config.selection, config.reconstruct_inputs, config.allocation) == ("none", "scores", False, "fluctuation")


def test_uniform_layers_replace_the_recipes_per_layer_allocation():
    """`--uniform-layers` asks for a standard config: the LLM default's per-layer allocation goes (it would be
    refused with it), the rest of its recipe stays; an allocation flag given with it is kept, and refused."""
    parser = build_parser("optin-hf")
    config = commands_jobs.optin_config(parser.parse_args(["prune", "--default", "shakespeare-smollm2", "--uniform-layers"]))
    assert (config.uniform_layers, config.allocation, config.selection, config.reconstruct_samples) == (True, "scores", "refit", 1280)
    with pytest.raises(ValueError, match="allocation='fluctuation'.*uniform_layers"):
        commands_jobs.optin_config(parser.parse_args(["prune", "--default", "shakespeare-smollm2", "--uniform-layers",
                                                      "--allocation", "fluctuation"]))


@pytest.fixture
def tilt_registered(monkeypatch):
    """A third-party criterion with a setting of its own (test_importance's), registered for one test."""
    from test_importance import LayerTiltImportance

    monkeypatch.setattr(CRITERIA, "_entries", dict(CRITERIA._entries))
    register_criterion("tilt", LayerTiltImportance)


def test_importance_option_flags_reach_a_registered_criterion_without_a_flag_of_its_own(built_jobs, tilt_registered):
    """`--importance-option KEY=VALUE` values are YAML scalars, checked against the criterion's own settings."""
    assert main(["prune", "--model", "m", "--dataset", "d.csv", "--importance", "tilt", "--importance-option", "tilt=3"]) == 0
    recipe = yaml.safe_load((REPO / "recipes" / DEFAULT_RECIPES["bbc-news"]).read_text())
    assert main(["prune", "--importance", "tilt", "--importance-option", "tilt = 2.5"]) == 0  # over a default's recipe
    by_model, by_default = (job.optin for job in built_jobs)
    assert by_model.importance_options == {"tilt": 3.0} and by_model.importance == "tilt"
    assert by_default.importance_options == {"tilt": 2.5} and by_default.num_samples == recipe["optin"]["num_samples"]


@pytest.mark.parametrize(
    "option, message",
    [
        ("tilt=steep", "error: importance_options of importance='tilt': tilt='steep' is a str; expected a finite number."),
        ("tlit=2", "error: importance_options: importance='tilt' has no setting 'tlit'; its settings are ['tilt']."),
        ("tilt", "error: --importance-option 'tilt' is not KEY=VALUE"),
        ("tilt=[1, 2]", "error: --importance-option 'tilt=[1, 2]': the value must be a single scalar"),
    ],
)
def test_a_bad_importance_option_flag_is_one_error_line(built_jobs, tilt_registered, capsys, option, message):
    assert main(["prune", "--model", "m", "--dataset", "d.csv", "--importance", "tilt", "--importance-option", option]) == 1
    assert capsys.readouterr().err.strip().startswith(message)
    assert built_jobs == []
