"""The one argparse definition of `optimum-cli optin ...` and `python -m optin_hf ...`.

optimum-cli builds these parsers at every start, whatever command runs, so this module imports
only `OptinConfig` (its defaults fill the help), and through it torch; transformers, datasets
and the pruning code load once a command really runs (`run_command`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import NoReturn

from ..config import ALLOCATIONS, RECONSTRUCT_MODES, SELECTIONS, OptinConfig
from ..criteria import AUTO_IMPORTANCE, BUILTIN_CRITERIA
from ..export.settings import ATOL, DEFAULT_OPSET, LATENCY_BATCH_SIZES, OPSETS, RTOL
from ..tasks.names import TASKS


def one_line_errors(parser: argparse.ArgumentParser) -> None:
    """Make `parser` report bad arguments in one line (argparse prints its whole usage first)."""

    def error(message: str) -> NoReturn:
        parser.exit(2, f"{parser.prog}: error: {message} (see --help)\n")

    parser.error = error  # type: ignore[method-assign]


def _add_debug(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--debug", action="store_true", help="on an error, show the whole traceback instead of one line")


DURATION_UNITS = {"s": 1.0, "m": 60.0, "h": 3600.0}


def parse_duration(text: str) -> float:
    """Seconds in `90s`, `10m`, `1.5h` or `600`; an argparse error otherwise."""
    value = text.strip().lower()
    scale = DURATION_UNITS.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = float("nan")
    if not seconds > 0 or seconds == float("inf"):
        raise argparse.ArgumentTypeError(f"{text!r} is not a positive duration: give e.g. 90s, 10m, 1.5h or seconds")
    return seconds


def _add_data(parser: argparse.ArgumentParser) -> None:
    group = parser.add_argument_group("data (a local folder or file, or a Hub dataset)")
    group.add_argument("--default", metavar="NAME", help="an embedded default (bbc-news, tweet-sentiment, digits-vit, digits-resnet, digit-scenes-segformer, "
                       "shakespeare-smollm2): its "
                       "data, and for prune its model; prune uses bbc-news when neither --model nor --default is given")
    group.add_argument("--dataset", metavar="PATH_OR_NAME",
                       help="a datasets.save_to_disk folder, a .csv/.json/.jsonl/.parquet file, or a Hub dataset name")
    group.add_argument("--dataset-config", metavar="NAME", help="the Hub dataset's configuration, e.g. mrpc for nyu-mll/glue")
    group.add_argument("--dataset-revision", metavar="REV", help="the Hub dataset's branch, tag or commit; a dataset that still "
                       "ships a loading script loads from refs/convert/parquet (with --data-dir CONFIG)")
    group.add_argument("--data-dir", metavar="DIR", help="the folder of the Hub dataset to read, e.g. scene_parsing in its parquet export")
    group.add_argument("--calibration-split", default="train", metavar="SPLIT",
                       help="split to draw calibration examples from; slicing works: 'train[:80%%]' (default: train)")
    group.add_argument("--eval-split", default="validation", metavar="SPLIT",
                       help="split to measure the metric on, e.g. 'train[80%%:]' for a single csv (default: validation)")
    group.add_argument("--text-column", metavar="COLUMN", help="text column (default: detected, e.g. text, sentence, premise)")
    group.add_argument("--text-pair-column", metavar="COLUMN", help="second text of sentence pairs (e.g. hypothesis)")
    group.add_argument("--image-column", metavar="COLUMN", help="image column (default: detected: pixel_values, image, img)")
    group.add_argument("--label-column", default="label", metavar="COLUMN", help="label column (default: label)")
    group.add_argument("--max-eval-samples", type=int, metavar="N", help="evaluate on the first N examples only "
                       "(text-generation: on N windows spread evenly over the split)")
    group.add_argument("--eval-window", type=int, metavar="N", help="text-generation: tokens per perplexity window, "
                       "consecutive and non-overlapping (default: --max-length)")
    group.add_argument("--streaming", action="store_true", help="stream the dataset instead of downloading whole splits")
    group.add_argument("--reduce-labels", action=argparse.BooleanOptionalAction, default=None,
                       help="segmentation: mask id 0 is unlabelled (ignored) and ids 1..K are classes 0..K-1, as in ADE20K's "
                       "scene_parse_150 (default: the image processor's do_reduce_labels)")
    group.add_argument("--metric", metavar="NAME", help="accuracy (default; segmentation: mean_iou; text-generation: perplexity; "
                       "evaluate: the pruning run's) or glue/<task>, e.g. glue/mrpc (accuracy, f1), glue/stsb (pearson, spearmanr)")


def add_prune_args(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser)
    _add_debug(parser)
    parser.add_argument("--model", metavar="PATH_OR_REPO", help="fine-tuned model folder or Hub id (default: an embedded default)")
    parser.add_argument("--task", choices=TASKS, help="default: from the model's architecture (semantic-segmentation for a ...ForSemanticSegmentation or ...ForUniversalSegmentation, text-generation for a ...ForCausalLM or ...LMHeadModel, image-classification for other vision models, else text)")
    parser.add_argument("--processor", metavar="PATH_OR_REPO", help="tokenizer or image processor, if not stored with the model")
    _add_data(parser)
    # Each setting defaults to None, read as "not given": an embedded default takes the rest from its recipe.
    optin = parser.add_argument_group("OPTIN settings (see OptinConfig)", "An embedded default starts from the settings of its "
                                      "recipe in recipes/ (bbc-news: minilm-bbc-news.yaml); each flag given replaces one.")
    optin.add_argument("--mac-constraint", type=float, default=None, metavar="F",
                       help=f"fraction of the MACs to keep (default: {OptinConfig.mac_constraint})")
    optin.add_argument("--importance", default=None, metavar="NAME",
                       help=f"{AUTO_IMPORTANCE}: the recipe (criterion and repair) whose pruned model is closest to the dense one "
                       f"on held-out calibration examples; or a criterion, used as named: {', '.join(BUILTIN_CRITERIA)} (optin: the "
                       f"paper's), or a registered one (default: {OptinConfig.importance}; an embedded default: its recipe's)")
    optin.add_argument("--importance-option", action="append", metavar="KEY=VALUE",
                       help="a setting of the criterion's own (OptinConfig.importance_options), VALUE read as a YAML "
                       "scalar (2, 0.5, true, text); repeat for several, each replaces the recipe's of that KEY")
    optin.add_argument("--num-samples", type=int, default=None, metavar="N",
                       help=f"calibration examples (default: {OptinConfig.num_samples}; embedded defaults: sized for a CPU by their recipes)")
    optin.add_argument("--neuron-group-size", type=int, default=None, metavar="G",
                       help=f"score FFN neurons G at a time, grouped by output energy (default: {OptinConfig.neuron_group_size}, as the paper)")
    optin.add_argument("--max-scoring-time", type=parse_duration, metavar="T",
                       help="fit scoring in T (90s, 10m, 1.5h or seconds): fewer examples and coarser neuron groups "
                       "are picked from the estimate; replaces an embedded default's CPU sizing (default: no limit)")
    optin.add_argument("--neurons-multiple-of", type=int, default=None, metavar="M",
                       help=f"each layer keeps a multiple of M FFN neurons, for fast matmuls (default: {OptinConfig.neurons_multiple_of}; 1 = exact)")
    optin.add_argument("--max-length", type=int, default=None, metavar="N",
                       help=f"truncate texts to N tokens (default: {OptinConfig.max_length})")
    optin.add_argument("--seed", type=int, default=None,
                       help=f"seeds the calibration draw and the MD token subset (default: {OptinConfig.seed})")
    optin.add_argument("--faithful", action=argparse.BooleanOptionalAction, default=None,
                       help=f"apply the reference's extra score weights (default: {OptinConfig.faithful})")
    optin.add_argument("--reconstruct", choices=RECONSTRUCT_MODES, default=None,
                       help="after slimming, refit each sublayer's output projection by least squares (weights), one "
                       "factor per kept unit (scales), re-estimate the BatchNorm means of a ResNet (batchnorm), or "
                       f"not at all (default: {OptinConfig.reconstruct})")
    optin.add_argument("--reconstruct-inputs", action=argparse.BooleanOptionalAction, default=None,
                       help="with the weights refit, refit each sublayer's input projections too (query/key/value, the FFN's "
                       f"up and gate; transformer families) (default: {OptinConfig.reconstruct_inputs}; an embedded default: its recipe's)")
    optin.add_argument("--reconstruct-readers", action=argparse.BooleanOptionalAction, default=None,
                       help="with the weights refit, refit each ResNet block's reduce conv and projection shortcut and the "
                       f"classifier too (default: {OptinConfig.reconstruct_readers}; an embedded default: its recipe's)")
    optin.add_argument("--reconstruct-samples", type=int, default=None, metavar="N",
                       help=f"calibration examples the reconstruction fits on (default: {OptinConfig.reconstruct_samples})")
    optin.add_argument("--checkpoint-dir", metavar="DIR",
                       help="save the scoring losses to DIR as they are computed: a run stopped (Ctrl-C, a crash) and "
                       "run again with the same DIR and settings resumes where it stopped (default: not saved)")
    optin.add_argument("--prune-steps", type=int, default=None, metavar="K",
                       help=f"cut in K steps, reconstructing and re-scoring between them (default: {OptinConfig.prune_steps})")
    optin.add_argument("--selection", choices=SELECTIONS, default=None,
                       help="which units each layer drops, given how many: the worst-scored (scores) or those whose removal "
                       f"the refit repairs best (refit; needs a refit repair) (default: {OptinConfig.selection})")
    optin.add_argument("--uniform-layers", action=argparse.BooleanOptionalAction, default=None,
                       help="every layer keeps the same numbers of heads and neurons, so a full checkpoint is the family's "
                       f"standard config (replaces a recipe's per-layer allocation) (default: {OptinConfig.uniform_layers})")
    optin.add_argument("--allocation", choices=ALLOCATIONS, default=None,
                       help="how many units each layer keeps: the family's own (auto: fluctuation for Llama-family "
                       "decoders, refit for small ConvNeXt, SegFormer and ViT models, else scores), by the scores (scores), "
                       "by the loss each layer's cuts leave after the refit, measured (refit; small models), or the uniform "
                       "split's heads with the neurons spread over layers by FLAP's fluctuation (fluctuation) "
                       f"(default: {OptinConfig.allocation})")
    parser.add_argument("--device", help="where to prune and time, e.g. cpu or cuda (default: cuda if available)")
    out = parser.add_argument_group("output")
    out.add_argument("--output", metavar="DIR", help="folder for the pruned model and report (default: <name>-optin-<F>)")
    out.add_argument("--push-to-hub", metavar="REPO", help="also upload to this Hub repo (masks only unless --full)")
    out.add_argument("--full", action="store_true", help="with --push-to-hub: upload the slim weights too")
    out.add_argument("--overwrite", action="store_true",
                     help="save into an --output folder that is not an optin-hf checkpoint: the files optin-hf "
                     "writes there are replaced, the others kept")


def add_evaluate_args(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser)
    _add_debug(parser)
    parser.add_argument("--model", required=True, metavar="DIR_OR_REPO",
                        help="a folder written by `optin prune`, or a dense model")
    parser.add_argument("--task", choices=TASKS, help="default: from the model's architecture")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help=f"truncate texts to N tokens (default: the pruning run's, or {OptinConfig.max_length})")
    parser.add_argument("--device", help="where to evaluate and time, e.g. cpu or cuda (default: cuda if available)")
    _add_data(parser)
    parser.epilog = "Without --dataset or --default, the data named in DIR/optin_report.json is used."


def add_recipe_args(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser)
    _add_debug(parser)
    parser.add_argument("recipe", metavar="RECIPE.yaml", help="a recipe file, e.g. recipes/minilm-bbc-news.yaml")
    parser.add_argument("--output", metavar="DIR", help="override the recipe's output folder")


def add_export_args(parser: argparse.ArgumentParser) -> None:
    one_line_errors(parser)
    formats = parser.add_subparsers(dest="format", metavar="{onnx}", required=True)
    onnx = formats.add_parser(
        "onnx", help="an ONNX graph checked in ONNX Runtime against PyTorch (needs pip install 'optin-hf[onnx]')",
        description="Export a pruned model (a folder written by `optin prune`, or a Hub repo, full or masks-only) to "
        "OUTPUT/model.onnx with OUTPUT/optin_onnx.json describing it (per-layer heads and neurons, inputs, outputs, "
        "the validation) and its tokenizer or image processor. The graph takes any batch size and text length (and "
        "image size: ResNet, ConvNeXt, SegFormer); attention stays unfused, so each layer keeps its own head count.",
    )
    one_line_errors(onnx)
    _add_debug(onnx)
    onnx.add_argument("--model", required=True, metavar="DIR_OR_HUB_ID", help="an optin-hf checkpoint: a folder or a Hub repo")
    onnx.add_argument("output", metavar="OUTPUT", help="folder to write into: new, empty, or an earlier export (replaced whole)")
    onnx.add_argument("--revision", metavar="REV", help="the Hub repo's branch, tag or commit")
    onnx.add_argument("--opset", type=int, default=DEFAULT_OPSET, choices=OPSETS, metavar="N",
                      help=f"ONNX opset, {OPSETS.start} to {OPSETS.stop - 1} (default: {DEFAULT_OPSET})")
    onnx.add_argument("--atol", type=float, default=ATOL, help=f"absolute tolerance of the check against PyTorch (default: {ATOL:g})")
    onnx.add_argument("--rtol", type=float, default=RTOL, help=f"relative tolerance of the check against PyTorch (default: {RTOL:g})")
    onnx.add_argument("--latency", action="store_true",
                      help="also time the slim model and its dense twin (same architecture, random weights) in ONNX "
                      f"Runtime and PyTorch at batch {' and '.join(map(str, LATENCY_BATCH_SIZES))}: printed and "
                      "written to optin_onnx.json")
    onnx.add_argument("--threads", type=int, metavar="N", help="threads of both runtimes for --latency (default: torch's)")


@dataclass(frozen=True)
class Command:
    name: str
    help: str
    add_args: Callable[[argparse.ArgumentParser], None]


COMMANDS = (
    Command("prune", "prune a model (default: the embedded BBC News MiniLM) and report what it gained", add_prune_args),
    Command("evaluate", "measure a pruned or dense model: metric, MACs, latency", add_evaluate_args),
    Command("recipe", "run a YAML recipe end to end", add_recipe_args),
    Command("export", "export a pruned model for deployment (onnx: ONNX Runtime)", add_export_args),
)
DESCRIPTION = "OPTIN structured pruning (retraining-free) of transformers into physically smaller models."


def build_parser(prog: str) -> argparse.ArgumentParser:
    """The `python -m optin_hf` parser: the same subcommands as `optimum-cli optin`."""
    parser = argparse.ArgumentParser(prog=prog, description=DESCRIPTION)
    one_line_errors(parser)
    subparsers = parser.add_subparsers(dest="command", metavar="{" + ",".join(c.name for c in COMMANDS) + "}")
    for command in COMMANDS:
        sub = subparsers.add_parser(command.name, help=command.help, description=command.help)
        command.add_args(sub)
    return parser


def run_command(name: str, args: argparse.Namespace) -> int:
    """Run a parsed command; user errors become one `error: ...` line and exit status 1 (with `--debug`,
    their traceback). Other exceptions are bugs and keep their traceback."""
    from .jobs import RUNNERS  # heavy (torch, transformers): only once a command really runs

    try:
        RUNNERS[name](args)
    except (ValueError, TypeError, OSError, ImportError) as err:
        if getattr(args, "debug", False):
            raise
        print(f"error: {' '.join(str(err).split())}", file=sys.stderr)
        return 1
    return 0
