"""What each command does with its parsed arguments: build a job, run it, print the report."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable

from ..config import OptinConfig
from ..tasks.recipes import load_recipe
from ..tasks.report import REPORT_JSON, REPORT_PNG
from ..tasks.task_data import DataSpec
from ..tasks.workflow import DEFAULT_TEXT_MODEL, PruneJob, run_evaluate, run_prune


def data_spec(args: argparse.Namespace) -> DataSpec | None:
    if args.dataset is None:
        flags = ("dataset_config", "dataset_revision", "data_dir", "text_column", "text_pair_column", "image_column",
                 "max_eval_samples", "reduce_labels")
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
    )


def _finish(job: PruneJob) -> None:
    report = run_prune(job)
    print(report.table())
    print(f"pruned model, {REPORT_JSON} and {REPORT_PNG} written to {job.output}")
    if job.push_to_hub:
        print(f"pushed to the Hub: {job.push_to_hub} ({'full weights' if job.push_full else 'masks only'})")


# The embedded defaults run on a 2-core CPU in a few minutes: fewer calibration examples and
# neurons scored in groups, and the cut made in the steps that measured best (each flag given on
# the command line still wins).
# Kept equal to recipes/{minilm-bbc-news,minilm-tweet-sentiment,vit-digits,digits-resnet,digit-scenes-segformer}.yaml.
EMBEDDED_DEFAULT_SETTINGS = {
    "bbc-news": {"num_samples": 8, "neuron_group_size": 64, "prune_steps": 2},
    "tweet-sentiment": {"num_samples": 32, "neuron_group_size": 64},
    "digits-vit": {"num_samples": 64, "neuron_group_size": 4},
    "digits-resnet": {"num_samples": 64, "neuron_group_size": 1},
    "digit-scenes-segformer": {"num_samples": 32, "neuron_group_size": 16},
}
# A default whose family cannot be refit is repaired as its family can (the ResNet: its BatchNorm means re-estimated)
# or not at all (SegFormer), unless the flag says otherwise.
EMBEDDED_DEFAULT_RECONSTRUCT = {"digits-resnet": "batchnorm", "digit-scenes-segformer": "none"}


def prune(args: argparse.Namespace) -> None:
    given = {k: getattr(args, k) for k in ("num_samples", "neuron_group_size", "prune_steps") if getattr(args, k) is not None}
    # A time budget sizes the run itself, from OptinConfig's defaults down.
    sized_by_hand = not args.model and args.max_scoring_time is None
    embedded = EMBEDDED_DEFAULT_SETTINGS.get(args.default or DEFAULT_TEXT_MODEL, {}) if sized_by_hand else {}
    sized = {**embedded, **given}
    optin = OptinConfig(
        mac_constraint=args.mac_constraint,
        importance=args.importance,
        max_length=args.max_length,
        seed=args.seed,
        faithful=args.faithful,
        neurons_multiple_of=args.neurons_multiple_of,
        reconstruct=args.reconstruct or EMBEDDED_DEFAULT_RECONSTRUCT.get(args.default, OptinConfig.reconstruct),
        reconstruct_samples=args.reconstruct_samples,
        max_scoring_time=args.max_scoring_time,
        checkpoint_dir=args.checkpoint_dir,
        **sized,
    )
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


RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {"prune": prune, "evaluate": evaluate, "recipe": recipe}
