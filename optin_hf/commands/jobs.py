"""What each command does with its parsed arguments: build a job, run it, print the report."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from typing import Any

import yaml

from ..config import OptinConfig
from ..tasks.recipes import default_recipe, load_recipe
from ..tasks.report import REPORT_JSON, REPORT_PNG
from ..tasks.task_data import DataSpec
from ..tasks.workflow import DEFAULT_TEXT_MODEL, PruneJob, run_evaluate, run_prune


def data_spec(args: argparse.Namespace) -> DataSpec | None:
    if args.dataset is None:
        flags = ("dataset_config", "dataset_revision", "data_dir", "text_column", "text_pair_column", "image_column",
                 "max_eval_samples", "reduce_labels", "eval_window")
        for flag in flags:
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --dataset.")
        return None
    return DataSpec(
        path=args.dataset,
        config=args.dataset_config,
        revision=args.dataset_revision,
        data_dir=args.data_dir,
        calibration_split=args.calibration_split,
        eval_split=args.eval_split,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        image_column=args.image_column,
        label_column=args.label_column,
        max_eval_samples=args.max_eval_samples,
        streaming=args.streaming,
        reduce_labels=args.reduce_labels,
        eval_window=args.eval_window,
    )


def _finish(job: PruneJob) -> None:
    report = run_prune(job)
    print(report.table())
    print(f"pruned model, {REPORT_JSON} and {REPORT_PNG} written to {job.output}")
    if job.push_to_hub:
        print(f"pushed to the Hub: {job.push_to_hub} ({'full weights' if job.push_full else 'masks only'})")


# The scoring sizes a time budget picks itself (`--max-scoring-time`), from OptinConfig's defaults down.
BUDGET_SIZED = ("num_samples", "neuron_group_size", "prune_steps")


def importance_options(pairs: list[str]) -> dict[str, Any]:
    """`--importance-option KEY=VALUE` flags as a mapping, each VALUE read as a YAML scalar (as in a recipe);
    `OptinConfig` then checks each against the criterion's settings."""
    options: dict[str, Any] = {}
    for pair in pairs:
        key, sep, text = pair.partition("=")
        if not sep or not key.strip():
            raise ValueError(f"--importance-option {pair!r} is not KEY=VALUE, e.g. --importance-option scale=0.5.")
        try:
            value = yaml.safe_load(text)
        except yaml.YAMLError as err:
            raise ValueError(f"--importance-option {pair!r}: {text!r} is not a YAML scalar ({err}).") from err
        if isinstance(value, (dict, list)):
            raise ValueError(f"--importance-option {pair!r}: the value must be a single scalar (a number, true/false or text).")
        options[key.strip()] = value
    return options


def optin_config(args: argparse.Namespace) -> OptinConfig:
    """The prune command's settings: an embedded default's recipe (none for a --model), with each flag given on
    the command line in place of the recipe's value. Every OptinConfig flag defaults to None, so "given" is
    "not None"."""
    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(OptinConfig) if getattr(args, f.name, None) is not None}
    options = importance_options(args.importance_option or [])
    if args.model:
        return OptinConfig(**given, importance_options=options)
    recipe = default_recipe(args.default or DEFAULT_TEXT_MODEL).optin
    if given.get("importance", recipe.importance) == recipe.importance:  # another criterion: the recipe's do not apply
        options = {**recipe.importance_options, **options}
    given["importance_options"] = options
    if args.max_scoring_time is not None:  # the budget replaces the recipe's hand-made sizing for a 2-core CPU
        given = {**{name: getattr(OptinConfig, name) for name in BUDGET_SIZED}, **given}
    return dataclasses.replace(recipe, **{**_taken_away(recipe, given), **given})


def _taken_away(recipe: OptinConfig, given: dict[str, Any]) -> dict[str, Any]:
    """The recipe's settings that a flag took away, at OptinConfig's defaults: those that need the refit (or the
    refit allocation) when --reconstruct or --allocation removes it, and a per-layer allocation under
    --uniform-layers. They go with it, as the recipe's importance options go with another criterion. Only the
    recipe's values are dropped; a flag given for one of them stays (and is refused if it conflicts)."""
    reconstruct = given.get("reconstruct", recipe.reconstruct)
    allocation = given.get("allocation", recipe.allocation)
    dropped: dict[str, Any] = {}
    if reconstruct not in ("auto", "weights"):  # the input projections and the readers are refit within the weights refit
        dropped.update(reconstruct_inputs=False, reconstruct_readers=False)
    if reconstruct not in ("auto", "weights", "scales"):  # choosing or counting units by the refit needs one
        dropped["selection"] = "scores"
        if allocation == "refit":
            dropped["allocation"] = "scores"
            allocation = given.get("allocation", "scores")
    if given.get("uniform_layers") and allocation != "scores":  # a per-layer allocation is what uniform layers replace
        dropped["allocation"] = "scores"
        allocation = given.get("allocation", "scores")
    if allocation != "refit":
        dropped["allocation_rounds"] = 1
    return {name: value for name, value in dropped.items() if name not in given}


def prune(args: argparse.Namespace) -> None:
    optin = optin_config(args)
    job = PruneJob(
        optin=optin,
        output=args.output,  # PruneJob checks it: "" is refused, not read as the default name
        default=args.default,
        model=args.model,
        task=args.task,
        data=data_spec(args),
        processor=args.processor,
        metric=args.metric,
        push_to_hub=args.push_to_hub,
        push_full=args.full,
        device=args.device,
        overwrite=args.overwrite,
    )
    _finish(job)


def evaluate(args: argparse.Namespace) -> None:
    report = run_evaluate(args.model, data_spec(args), args.default, args.task, args.metric, args.max_length, args.device)
    print(report.table())


def recipe(args: argparse.Namespace) -> None:
    job = load_recipe(args.recipe)
    if args.output is not None:
        job = dataclasses.replace(job, output=args.output)
    _finish(job)


def export(args: argparse.Namespace) -> None:
    from ..export.deploy import export_onnx, export_summary  # onnx and onnxruntime: the `onnx` extra
    from ..export.settings import LATENCY_BATCH_SIZES

    described = export_onnx(args.model, args.output, revision=args.revision, opset=args.opset, atol=args.atol,
                            rtol=args.rtol, latency_batch_sizes=LATENCY_BATCH_SIZES if args.latency else (),
                            threads=args.threads)
    print(export_summary(described, args.output))


RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {
    "prune": prune, "evaluate": evaluate, "recipe": recipe, "export": export,
}
