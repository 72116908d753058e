"""What each command does with its parsed arguments: build a job, run it, print the report."""

from __future__ import annotations

import argparse
import dataclasses
from collections.abc import Callable
from pathlib import Path

from ..config import OptinConfig
from ..metrics import DEFAULT_METRIC
from ..recipes import load_recipe
from ..report import REPORT_JSON, REPORT_PNG
from ..task_data import DataSpec
from ..workflow import PruneJob, run_evaluate, run_prune


def data_spec(args: argparse.Namespace) -> DataSpec | None:
    if args.dataset is None:
        for flag in ("dataset_config", "text_column", "text_pair_column", "image_column", "max_eval_samples"):
            if getattr(args, flag) is not None:
                raise ValueError(f"--{flag.replace('_', '-')} needs --dataset.")
        return None
    return DataSpec(
        path=args.dataset,
        config=args.dataset_config,
        calibration_split=args.calibration_split,
        eval_split=args.eval_split,
        text_column=args.text_column,
        text_pair_column=args.text_pair_column,
        image_column=args.image_column,
        label_column=args.label_column,
        max_eval_samples=args.max_eval_samples,
        streaming=args.streaming,
    )


def _finish(job: PruneJob) -> None:
    report = run_prune(job)
    print(report.table())
    print(f"pruned model, {REPORT_JSON} and {REPORT_PNG} written to {job.output}")
    if job.push_to_hub:
        print(f"pushed to the Hub: {job.push_to_hub} ({'full weights' if job.push_full else 'masks only'})")


def prune(args: argparse.Namespace) -> None:
    optin = OptinConfig(
        mac_constraint=args.mac_constraint,
        importance=args.importance,
        num_samples=args.num_samples,
        max_length=args.max_length,
        seed=args.seed,
        faithful=args.faithful,
    )
    job = PruneJob(
        optin=optin,
        output=Path(args.output) if args.output else None,
        default=args.default,
        model=args.model,
        task=args.task,
        data=data_spec(args),
        processor=args.processor,
        metric=args.metric or DEFAULT_METRIC,
        push_to_hub=args.push_to_hub,
        push_full=args.full,
        device=args.device,
    )
    _finish(job)


def evaluate(args: argparse.Namespace) -> None:
    report = run_evaluate(args.model, data_spec(args), args.default, args.task, args.metric, args.max_length, args.device)
    print(report.table())


def recipe(args: argparse.Namespace) -> None:
    job = load_recipe(args.recipe)
    if args.output:
        job = dataclasses.replace(job, output=Path(args.output))
    _finish(job)


RUNNERS: dict[str, Callable[[argparse.Namespace], None]] = {"prune": prune, "evaluate": evaluate, "recipe": recipe}
