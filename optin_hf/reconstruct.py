"""Reconstruction after slimming: refit each sublayer's output projection by ridge least squares.

Removing heads and neurons shifts what every sublayer adds to the residual stream, and the
shifts compound. Each sublayer's output projection (attention output, FFN down projection) is
linear in the kept units, so the weights that best rebuild the dense model's sum
(projection output + residual) from the pruned model's own inputs have a closed form.

From the first layer up, attention then FFN, with the pruned model already refit below:
- `A = [x_p, 1]`: the projection's input in the pruned model, real tokens only, plus a ones
  column for the bias; the target `Y = (W x_d + b + r_d) - r_p`: the dense sum minus the
  pruned model's own residual. For post-LN blocks (BERT) the dense sum is the LayerNorm's
  input, for pre-LN blocks (ViT) the residual stream after the block: the same formula. Where a
  per-channel layer scale λ multiplies the branch (DINOv2, `ArchAdapter.branch_scale`), the fit is
  of λ ⊙ (W x_p + b) to `(λ ⊙ (W x_d + b) + r_d) - r_p`: the scaled projection is solved for and λ
  divided out, so the residual drift counts as (r_d - r_p) / λ in the projection's own units.
- `AᵀA` and `AᵀY` are accumulated batch by batch into float64 sums (`least_squares.NormalEquations`: float32
  products against the residual of θ₀), so memory does not grow with the calibration size, and the refit solves
  `(AᵀA + λI) θ = AᵀY + λ θ₀` with `λ = ridge · mean(diag(AᵀA))`: a ridge toward the weights the kept units had (θ₀), so a
  small calibration set moves them little, nothing pruned changes nothing, and the refit's
  error on the calibration data never exceeds θ₀'s.
- `mode="weights"` refits the weight and bias (K-prune's knowledge-preserving weight tuning);
  `mode="scales"` fits one factor per kept head or neuron with the bias fixed (PTF's mask
  tuning), a far smaller artifact. A sublayer that keeps nothing refits its bias only.

Input projections (`inputs=True`, `OptinConfig.reconstruct_inputs`, families declaring `Capabilities.inputs`): the
slim stream drifts from the dense one layer by layer, and what a sublayer computes first from it (its query, key and
value; its FFN's up and gate) is linear in its own input. So before each output projection is refit, each input
projection (`ArchAdapter.input_slices`) is fit, in the same ridge least squares toward its own weights, from its input
in the slim model (the attention's refit already done, for the FFN's) to the dense twin's output at the features it
keeps; those reading one tensor share one Gram, and their sums need only the two inputs (`least_squares.DriftEquations`).
The artifact holds them as `layers.{i}.inputs.{path}.weight` / `.bias`.
On the language-model default this gained 1.0-1.2% of perplexity at 0.8 of the MACs on its development plays
(benchmarks/RESULTS.md).

The dense side of each layer starts from the dense run recorded once for the refit selection and the refit
(`dense_calls`). Where a layer outputs its FFN sum (`ArchAdapter.output_is_ffn_sum`: pre-norm Llama and GPT-2 layers)
that recorded output is the FFN's target, so the dense layer reruns only up to its FFN input; and a watch of input
projections' inputs skips their products (`_skipped`). Neither changes a result (the conformance suite compares both
ways bit for bit); on the language-model default they took the refit from 160 s to 112 s (benchmarks/RESULTS.md, s40).

Token-merged ViTs: the dense stream is merged with the pruned model's own matches, so both
streams hold the same tokens.

Windowed attention (Swin): the attention output projection runs on the rows of shifted windows
of a map padded to whole windows; its input and output rows are put back in token order
(`ArchAdapter.token_order`, the padding dropped) before they are paired with the residual.
Layers that do not chain (`ArchAdapter.chained_layers` False: Swin's patch mergings, SegFormer's
stage norms and patch embeddings): the pruned stream reaches the next layer through the model's
own forward with the layers so far replayed (`_next_input`), the dense one from the dense run.

A conv before a BatchNorm (`ArchAdapter.refit_conv`: ResNet's 3x3 conv, from the heads to the neurons) is
refit first in `mode="weights"`, as a linear map of its input's patches: `A = [patches of x_p, 1]`, `Y` the dense
conv's output at the channels it keeps, the same ridge toward its weights; its bias is folded into the
BatchNorm's running mean (BN(Wx + b) with mean μ is BN(Wx) with mean μ - b). The artifact holds the conv's
weight and that running mean.

Cut residual channels (`OptinConfig.prune_channels`, ResNet): every conv that reads a cut residual stream (each
block's reduce conv and projection shortcut, `ArchAdapter.channel_readers`, the first block's reading the stem's
output) is refit first in its block, in `mode="weights"`, as the refit conv is: from the patches of the slim block's
own input (its kept channels) to the dense conv's pre-BatchNorm output at the channels it keeps, its bias folded into
its BatchNorm's running mean. The block's last conv is then fit to the dense pre-activation sum at the residual
channels the block keeps (`kept_block_outputs`), and the classifier after the average pooling (`channel_classifier`)
to the dense logits, position by position on the last map (the average of those fits is the pooled one, with many
more rows than images). The slim stream starts from the slim model's own stem. The artifact holds those convs'
weights and means and the classifier's `classifier.weight` / `.bias`.

`readers=True` (`OptinConfig.reconstruct_readers`, weights mode, ResNet) refits those readers in every block, the
residual widths cut or kept: their input drifts with the pruning of the blocks below all the same. A classifier
reading the whole width is then fit on the pooled features (one row per image: the logits the model computes) to the
dense logits. On digits-resnet's development judge (1,181 training images as they are and moved by one pixel) this
cut the pruned model's disagreements with the dense model at 0.6 of the MACs from 286 to 197 (benchmarks/RESULTS.md).
The artifact holds them as above; the refit allocation prices its cuts without them (`refit_convs=False`).

`mode="batchnorm"` on a model with cut residual channels runs that consumer refit first (the readers and the
classifier only), then re-estimates the means: the means alone left the wide-stem ResNet 27.3 points down at 0.6 of
the MACs on its development folds, the consumer refit and the means lost 0.8 there, the full refit ("weights")
gained 0.8 (benchmarks/RESULTS.md).

CNNs with BatchNorm (ResNet) can also take `mode="batchnorm"`, which refits no weight. A removed
channel is a post-ReLU output with a positive mean, so removing it shifts the next conv's output by
its mean times the conv's weights, and an eval-mode BatchNorm, whose running statistics are fixed,
passes that shift on; many removed channels' shifts add up and carry into later blocks. So, from the
first block that lost a channel on, each BatchNorm's running mean is re-estimated as the exact mean
of what it receives on the calibration data in the slim model in eval mode, BatchNorm by BatchNorm in forward order (each
one measured with the earlier ones already re-centred: the statistics the repaired model really
meets). The running variances are kept: re-estimating them too (also BatchNorm train-mode
passes with cumulative averages) scaled up channels that pruning left near-constant and did worse
on a development split (`benchmarks/RESULTS.md`). The artifact is the new running means.
"""

from __future__ import annotations

import copy
import math
import os
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import REPAIRS, ArchAdapter, Projection, check_model, get_submodule, require
from .arch.projection import feature_dim, slice_features
from .capture import scoring_forward
from .dense_calls import dense_calls
from .engine.prefix import LayerCall
from .engine.replay import layer_output, replay_layers
from .least_squares import (DriftEquations, NormalEquations, map_rows, patches, record, solve_scales, solve_weights,
                            stacked_theta, write_solved)
from .link_refit import LINKS, copy_links, link_destination, with_links
from .masks import PruningMasks, load_safetensors
from .memory import release_freed_memory
from .tokens import TokenMerging, merge_matched

RECONSTRUCTION_NAME = "optin_reconstruction.safetensors"
RUNNING_MEAN = "running_mean"
CONV_WEIGHT = "convolution.weight"
INPUTS = "inputs"  # the artifact's input projections: layers.{i}.inputs.{path}.weight


class _Stop(Exception):
    """Ends a layer call once the hooks saw what they need."""


def output_projection(adapter: ArchAdapter, layer: nn.Module, sublayer: str) -> Projection:
    """The attention output (`attn_out`) or FFN down (`ffn_down`) projection of a layer, read through the
    projection contract (any weight orientation, bias or none)."""
    return adapter.projection(layer, sublayer)


def _call(layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, taps: dict, stop: str | None = None) -> dict:
    """Call `layer`, returning what the taps saw: name -> tensor.

    taps: name -> (module, "in" for its first input | "out" for its output); a tap named `stop`
    ends the call once it fired. "layer" holds the layer's input after its own pre-hooks (a
    token merge) and "layer_args" the rest of that call.
    """
    seen: dict = {}
    handles = []

    def pre(name):
        def hook(module, args, kwargs=None):
            seen[name] = args[0]
            if name == "layer":
                seen["layer_args"] = (tuple(args[1:]), dict(kwargs or {}))
            if name == stop:
                raise _Stop

        return hook

    def post(name):
        def hook(module, args, output):
            # a copy: the layer may add to it in place (ResNet adds its shortcut to the last BatchNorm's output)
            seen[name] = (output[0] if isinstance(output, tuple) else output).clone()
            if name == stop:
                raise _Stop

        return hook

    try:
        handles.append(layer.register_forward_pre_hook(pre("layer"), with_kwargs=True))
        for name, (module, where) in taps.items():
            handles.append(module.register_forward_pre_hook(pre(name)) if where == "in" else module.register_forward_hook(post(name)))
        try:
            out = layer(hidden, *args, **kwargs)
            seen["output"] = out[0] if isinstance(out, tuple) else out
        except _Stop:
            pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _watch(taps: dict[str, tuple[nn.Module, str]], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """What the taps (name -> (module, "in" for its first input | "out" for a copy of its output)) see first
    while `run()` runs; the run stops once every tap fired."""
    seen: dict[str, torch.Tensor] = {}

    def keep(name: str, value: torch.Tensor) -> None:
        seen.setdefault(name, value)
        if len(seen) == len(taps):
            raise _Stop

    handles = [module.register_forward_pre_hook(lambda m, args, name=name: keep(name, args[0])) if where == "in" else
               module.register_forward_hook(lambda m, args, out, name=name: keep(name, _first(out).clone()))
               for name, (module, where) in taps.items()]
    try:
        run()
    except _Stop:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return seen


def _input_of(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The first input `module` receives while `run()` runs; the run stops there."""
    return _watch({"x": (module, "in")}, run)["x"]


@contextmanager
def _skipped(modules: Iterable[nn.Module]) -> Iterator[None]:
    """Inside: each of these Linear / Conv1D `modules` returns zeros of its output's shape instead of its product (its
    forward hooks still fire). For a `_watch` of input projections' inputs: a sublayer's input projections never read
    each other's outputs, and what is computed from them is not watched, so their products would be thrown away (on
    the language-model default, a query and a key product per layer and batch, and a gate product twice)."""
    saved = []
    for module in modules:
        width = Projection(module).out_features
        saved.append((module, module.__dict__.get("forward")))  # an accelerate hook's forward is put back
        module.forward = lambda x, *args, width=width, **kwargs: x.new_zeros(*x.shape[:-1], width)
    try:
        yield
    finally:
        for module, forward in saved:
            if forward is None:
                del module.forward
            else:
                module.forward = forward


def _watch_inputs(modules: dict[str, nn.Module], run: Callable[[], object]) -> dict[str, torch.Tensor]:
    """The first input each of `modules` (a sublayer's input projections, by path) receives while `run()` runs;
    their products skipped (`_skipped`), the run stopped once every one fired."""
    with _skipped(modules.values()):
        return _watch({path: (module, "in") for path, module in modules.items()}, run)


def _dense_layer(
    layer: nn.Module, hidden: torch.Tensor, args: tuple, kwargs: dict, taps: dict, whole: bool,
    skip: Iterable[nn.Module] = (),
) -> dict:
    """What the dense `layer`'s run on `hidden` saw: the whole run (`_call`, its output included), or where `whole` is
    False the taps alone, the run stopped once every one fired and the products of `skip` (input projections that no
    tap reads after) left out (`_skipped`)."""
    if whole:
        return _call(layer, hidden, args, kwargs, taps)
    with _skipped(skip):
        return _watch(taps, lambda: layer(hidden, *args, **kwargs))


def _recorded_output(calls: list[LayerCall], index: int) -> torch.Tensor:
    """Layer `index`'s output in the recorded dense run: its own where recorded (the last layer, or layers that do not
    chain), else the next layer's input."""
    return calls[index].output if calls[index].output is not None else calls[index + 1].hidden


@dataclass
class _Stream:
    """One calibration batch moving through both models, a layer at a time.

    student / teacher: [batch, tokens, hidden], the current layer's input in the pruned and the
    dense model; batch: the calibration batch; calls: each layer's call in the dense run (its arguments
    after the hidden states, replayed for both models; its input and output where the layers do not
    chain, `ArchAdapter.chained_layers`); real: bool [batch * tokens] of the rows that are real tokens (None: all);
    sizes: patch sizes [batch, patches, 1] of the merged tokens so far, when tokens merge;
    target: the dense FFN sum of the layer in progress, as rows of the down projection's output; call: the
    layer's arguments as the pruned layer received them (after its own pre-hooks: a token merge); x: the
    pruned model's input of the projection being refit; residual: its FFN input (`finish_attention`'s output);
    dense: what the dense layer's run saw (`_call`), where the input projections are refit.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    batch: dict[str, torch.Tensor]
    calls: list[LayerCall]
    real: torch.Tensor | None
    sizes: torch.Tensor | None = None
    target: torch.Tensor | None = None
    x: torch.Tensor | None = None
    residual: torch.Tensor | None = None
    call: tuple[tuple, dict] | None = None
    dense: dict | None = None


@dataclass
class Reconstruction:
    """What a reconstruction changed. tensors: the artifact (`layers.{i}.{sublayer}.weight/bias`
    in weights mode, with a refit conv's `layers.{i}.{path}.convolution.weight` and its BatchNorm's
    `.normalization.running_mean`; `.scale` [kept units] in scales mode, `layers.{i}.{path}.running_mean` of a
    BatchNorm in batchnorm mode); errors: (layer, sublayer, refit conv or BatchNorm path, error before, error
    after) on the calibration tokens, Σ of squared differences to the target."""

    mode: str
    tensors: dict[str, torch.Tensor]
    errors: list[tuple[int, str, float, float]]


def _refit(
    proj: Projection, eq: NormalEquations, mode: str, ridge: float, unit: int, key: str, tensors: dict,
    branch: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Refit `proj` (in place) from its normal equations; record the artifact under `key`; the
    calibration error (before, after). A projection without a bias keeps none. `branch`: the
    per-channel factor [hidden] on the projection's output before the residual adds it (a layer
    scale, `ArchAdapter.branch_scale`), or None; with it the equations' target is in the residual
    stream's units and the refit solves for the scaled projection, then divides the factor out.
    Weights are recorded as [out, in] matrices, whatever the module's own layout."""
    weight, bias = proj.weight(), proj.bias()
    before = eq.error(stacked_theta(weight, bias, branch))
    if mode == "weights":
        solved = solve_weights(eq, stacked_theta(weight, bias, branch), ridge)
        write_solved(proj, solved if branch is None else solved / branch.double()[None, :], key, tensors)
        return before, eq.error(stacked_theta(proj.weight(), proj.bias(), branch))
    if not proj.in_features:  # scales of no column: nothing to refit (a projection that re-parameterizes on `set` stays)
        return before, before
    scaled = stacked_theta(weight, bias, branch)
    scaled_bias = scaled[-1] if bias is not None else None
    scale = solve_scales(eq, scaled[: proj.in_features].T, scaled_bias, unit, ridge).to(weight.dtype)
    tensors[f"{key}.scale"] = scale.cpu()
    weight = scale_columns(weight, scale)
    proj.set(weight, bias)
    return before, eq.error(stacked_theta(weight, bias, branch))


@dataclass
class _Input:
    """One input projection being refit: the slim model's (`proj`), its dense twin and the dense output features the
    slim one keeps."""

    proj: Projection
    dense: nn.Module
    kept: torch.Tensor


def _inputs_of(
    adapter: ArchAdapter, student: nn.Module, teacher: nn.Module, config, sublayer: str, keep: torch.Tensor
) -> dict[str, _Input]:
    """`sublayer`'s input projections (`ArchAdapter.input_slices`) by path, for a layer keeping units `keep`."""
    width = adapter.layer_head_dim(teacher, config) if sublayer == "attn_out" else 1
    inputs = {}
    for part in adapter.input_slices(teacher, config, sublayer):
        dense = get_submodule(teacher, part.path)
        kept = slice_features(dense, part, keep, width).to(Projection(dense).device)
        inputs[part.path] = _Input(Projection(get_submodule(student, part.path)), dense, kept)
    return inputs


def _refit_inputs(
    inputs: dict[str, _Input], seen: Iterable[tuple[dict, dict, torch.Tensor | None]], ridge: float, index: int,
    tensors: dict[str, torch.Tensor],
) -> list[tuple[int, str, float, float]]:
    """Refit the input projections `inputs` (in place, `mode="weights"`) from what `seen` yields per calibration batch:
    (each one's input in the slim model, each dense twin's input, the real-token rows or None), the slim input to the
    dense output at the kept features; record their artifact (`layers.{index}.inputs.{path}.weight` / `.bias`). The
    projections that read one input tensor with the same bias (query, key, value) share one set of sums
    (`DriftEquations`: the dense output is the twin's weights on its input, so the sums need only the two inputs).
    The calibration errors (layer, "inputs." + their paths joined by "+", before, after)."""
    groups: list[list[str]] = []
    sums: list[DriftEquations] = []
    for x, x_dense, real in seen:
        if not groups:  # which projections read the very same tensor
            for path in inputs:
                group = next((g for g in groups if x[g[0]] is x[path] and inputs[g[0]].proj.has_bias == inputs[path].proj.has_bias), None)
                if group is None:
                    groups.append([path])
                else:
                    group.append(path)
            sums = [DriftEquations(inputs[g[0]].proj.in_features, inputs[g[0]].proj.device, inputs[g[0]].proj.has_bias)
                    for g in groups]
        for group, drift in zip(groups, sums):
            if any(x_dense[p] is not x_dense[group[0]] for p in group):
                raise RuntimeError(f"the dense twins of {group} read different tensors where their slim ones share one")
            first = inputs[group[0]].proj
            drift.add(first.rows(x[group[0]]), first.rows(x_dense[group[0]]), real)
    errors = []
    for group, drift in zip(groups, sums):
        projs = [inputs[p].proj for p in group]
        theta0 = _group_theta(inputs, group)
        eq = drift.equations(torch.cat([_dense_theta(inputs[p]) for p in group], dim=1), theta0)
        solved = solve_weights(eq, theta0, ridge)
        errors.append((index, "inputs." + "+".join(group), eq.error(theta0), eq.error(solved)))
        for path, proj, theta in zip(group, projs, solved.split([proj.out_features for proj in projs], dim=1)):
            write_solved(proj, theta, f"layers.{index}.{INPUTS}.{path}", tensors)
    return errors


def _dense_theta(part: _Input) -> torch.Tensor:
    """θ [in (+ 1), kept outputs] of an input projection's dense twin at the features the slim one keeps."""
    dense = Projection(part.dense)
    bias = dense.bias()
    return stacked_theta(dense.weight()[part.kept], bias[part.kept] if bias is not None else None, None)


def _group_theta(inputs: dict[str, _Input], group: list[str]) -> torch.Tensor:
    """θ₀ of input projections that share one set of sums, side by side [in (+ 1), their outputs]."""
    return torch.cat([stacked_theta(inputs[p].proj.weight(), inputs[p].proj.bias(), None) for p in group], dim=1)


def refit_conv_tensors(layer: nn.Module, index: int, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    """The artifact of `layer`'s refit conv (`ArchAdapter.refit_conv`; none if the family has none): its weight and
    its BatchNorm's running mean, keyed `layers.{index}.{path}.convolution.weight` / `.normalization.running_mean`."""
    return {} if adapter.refit_conv is None else _conv_tensors(layer, index, adapter.refit_conv)


def _conv_tensors(layer: nn.Module, index: int, path: str) -> dict[str, torch.Tensor]:
    """The artifact of the conv layer at `path` of `layer` (a `convolution` and its `normalization`): its weight and
    its BatchNorm's running mean, keyed `layers.{index}.{path}.convolution.weight` / `.normalization.running_mean`."""
    conv_layer = get_submodule(layer, path)
    key = f"layers.{index}.{path}"
    return {f"{key}.{CONV_WEIGHT}": conv_layer.convolution.weight.detach().cpu().clone(),
            f"{key}.normalization.{RUNNING_MEAN}": conv_layer.normalization.running_mean.detach().cpu().clone()}


def input_tensors(model: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    """The artifact of the slim `model`'s input projections (`layers.{i}.inputs.{path}.weight` / `.bias`), as it holds
    them: what a loaded full checkpoint pruned with `reconstruct_inputs` carries of them, to save again masks-only."""
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.layers_of(model)):
        for path in sorted(_input_paths(adapter, layer, model.config)):
            proj = Projection(get_submodule(layer, path))
            record(tensors, f"layers.{i}.{INPUTS}.{path}", proj.weight(), proj.bias())
    return tensors


def reader_tensors(model: nn.Module, adapter: ArchAdapter) -> dict[str, torch.Tensor]:
    """The artifact of a ResNet's convs that read each block's input (`channel_readers`) and its classifier, as the
    slim `model` holds them (refit or not): what a loaded full checkpoint carries of them, to save again masks-only."""
    if not adapter.supports("readers"):
        return {}
    tensors: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(adapter.layers_of(model)):
        for path in _readers(adapter, layer, layer, every=True):
            tensors.update(_conv_tensors(layer, i, path))
    linear = adapter.channel_classifier(model)
    if linear is not None:
        record(tensors, "classifier", linear.weight, linear.bias)
    return tensors


def _readers(adapter: ArchAdapter, student: nn.Module, teacher: nn.Module, every: bool = False) -> list[str]:
    """The paths of `student`'s conv layers that read the block's input (`ArchAdapter.channel_readers`) and keep an
    output channel: those that read it with fewer channels than `teacher`'s (a cut residual stream), or with `every`
    all of them (`reconstruct_readers`: the widths kept, where their input drifted all the same)."""
    def conv(layer: nn.Module, path: str) -> nn.Conv2d | None:
        return getattr(get_submodule(layer, path), "convolution", None)  # an identity shortcut has none

    return [path for path in adapter.channel_readers if conv(student, path) is not None and conv(student, path).out_channels
            and (every or conv(student, path).in_channels < conv(teacher, path).in_channels)]


def _refit_readers(
    adapter: ArchAdapter, student: nn.Module, teacher: nn.Module, paths: list[str], streams: list[_Stream], index: int,
    ridge: float, tensors: dict[str, torch.Tensor],
) -> list[tuple[int, str, float, float]]:
    """Refit the conv layers at `paths` of `student` (in place), which read a cut residual stream, from the patches of
    the slim layer's own input to the dense conv's output at the channels each keeps (module docstring); record their
    artifact; the calibration errors (layer, path, before, after)."""
    layers = {path: get_submodule(student, path) for path in paths}
    eqs = {path: NormalEquations(c.convolution.in_channels * math.prod(c.convolution.kernel_size), c.convolution.out_channels,
                                  c.convolution.weight.device, start=_conv_theta(c.convolution)) for path, c in layers.items()}
    kept = {path: adapter.kept_reader_outputs(student, path) for path in paths}
    taps = {path: (get_submodule(teacher, path).convolution, "out") for path in paths}
    for s in streams:
        call = s.calls[index]
        seen = _watch(taps, lambda s=s, call=call: teacher(s.teacher, *call.args, **call.kwargs))
        for path, conv_layer in layers.items():
            y = map_rows(seen[path][:, kept[path].to(seen[path].device)])
            eqs[path].add(patches(conv_layer.convolution, s.student, y.shape[0] // s.student.shape[0]), y, None)
    errors = []
    for path, conv_layer in layers.items():
        errors.append((index, path, *_refit_conv(conv_layer, eqs[path], ridge)))
        tensors.update(_conv_tensors(student, index, path))
    return errors


def _refit_classifier(
    model: nn.Module, dense: nn.Module, adapter: ArchAdapter, streams: list[_Stream], ridge: float, tensors: dict,
    every: bool = False,
) -> list[tuple[int, str, float, float]]:
    """Refit the classifier that reads a cut last residual group (in place), position by position on the last map
    (module docstring); its calibration error (before, after), or nothing where it reads the whole width. `every`
    (`reconstruct_readers`): one that reads the whole width is refit too, on the pooled maps (one row per image)."""
    linear, dense_linear = adapter.channel_classifier(model), adapter.channel_classifier(dense)
    whole = linear is not None and linear.in_features == dense_linear.in_features
    if linear is None or (whole and not every):
        return []
    classifier = Projection(linear)
    eq = NormalEquations(linear.in_features, linear.out_features, linear.weight.device, linear.bias is not None,
                         stacked_theta(classifier.weight(), classifier.bias(), None))
    for s in streams:
        if whole:  # the logits the model computes (digits-resnet's development judge: benchmarks/RESULTS.md)
            eq.add(s.student.mean((2, 3)), dense_linear(s.teacher.mean((2, 3))), None)
        else:
            eq.add(map_rows(s.student), dense_linear(map_rows(s.teacher)), None)
    last = len(adapter.layers_of(model)) - 1
    return [(last, "classifier", *_refit(classifier, eq, "weights", ridge, 1, "classifier", tensors))]


def _refit_consumers(
    model: nn.Module, dense: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], ridge: float
) -> Reconstruction:
    """The consumer refit alone (the convs reading cut residual channels, then the classifier), layer by layer on the
    slim model's own stream: what `mode="batchnorm"` runs before it re-estimates the means (module docstring)."""
    tensors: dict[str, torch.Tensor] = {}
    errors: list[tuple[int, str, float, float]] = []
    streams = _streams(dense, adapter, batches)
    pairs = list(zip(adapter.layers_of(model), adapter.layers_of(dense)))
    for s in streams:
        s.student = _input_of(pairs[0][0], lambda s=s: scoring_forward(model, s.batch))
    for i, (student, teacher) in enumerate(pairs):
        errors += _refit_readers(adapter, student, teacher, _readers(adapter, student, teacher), streams, i, ridge, tensors)
        for s in streams:  # a ResNet's blocks chain and take no arguments beyond the map
            s.student, s.teacher = _first(student(s.student)), _first(teacher(s.teacher))
    errors += _refit_classifier(model, dense, adapter, streams, ridge, tensors)
    return Reconstruction("batchnorm", tensors, errors)


def _refit_conv(conv_layer: nn.Module, eq: NormalEquations, ridge: float) -> tuple[float, float]:
    """Refit a conv (no bias) and its BatchNorm's running mean (in place) from its normal equations over its
    input's patches; the calibration error (before, after)."""
    conv, norm = conv_layer.convolution, conv_layer.normalization
    theta0 = _conv_theta(conv)
    before = eq.error(theta0)
    solved = solve_weights(eq, theta0, ridge)
    conv.weight.copy_(solved[:-1].T.reshape(conv.weight.shape).to(conv.weight.dtype))
    norm.running_mean.sub_(solved[-1].to(norm.running_mean.dtype))
    return before, eq.error(torch.cat([conv.weight.detach().double().flatten(1).T, solved[-1:]]))


def _conv_theta(conv: nn.Conv2d) -> torch.Tensor:
    """θ [in · kernel area + 1, out] of a bias-free conv over its patches, the constant column's row (the bias the
    refit folds into the BatchNorm's mean) zero."""
    weight = conv.weight.detach()
    return torch.cat([weight.double().flatten(1).T, weight.new_zeros(1, conv.out_channels, dtype=torch.float64)])


def scale_columns(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [out, units * w] with each unit's w input columns multiplied by its factor in scale [units]."""
    return weight * scale.to(weight.dtype).repeat_interleave(weight.shape[1] // max(len(scale), 1))[None, :]


def _streams(
    teacher: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], progress: bool = True
) -> list[_Stream]:
    """Each batch's dense run (`dense_calls`): layer 0's input, where the pruned model starts too, and every layer's
    call arguments (a Swin stage's map size, SegFormer's height and width), replayed for both models."""
    return [_Stream(run.calls[0].hidden, run.calls[0].hidden, run.batch, run.calls, run.real)
            for run in dense_calls(teacher, adapter, batches, progress)]


def _next_input(model: nn.Module, adapter: ArchAdapter, layer: int, output: torch.Tensor, stream: _Stream) -> torch.Tensor:
    """The input of `model`'s layer `layer + 1` when layer `layer` outputs `output`, for a model whose layers
    do not chain: its own forward on the stream's batch, the layers up to `layer` replayed (those before it
    with their dense outputs, which reach no later layer: `layer` is replayed), stopped at that input."""
    layers = adapter.layers_of(model)
    outputs = {j: layer_output(call.output, call.tuple_size) for j, call in enumerate(stream.calls[:layer])}
    outputs[layer] = layer_output(output, stream.calls[layer].tuple_size)
    with replay_layers(layers, outputs):
        return _input_of(layers[layer + 1], lambda: scoring_forward(model, stream.batch))


def _merge_like(x: torch.Tensor, sizes: torch.Tensor, merging: TokenMerging) -> torch.Tensor:
    """x [batch, tokens, hidden] merged by the pruned model's last matches, its patches having `sizes`."""
    prefix = merging.num_prefix_tokens
    patches = x[:, prefix:]
    for match in merging.matches:
        patches, sizes = merge_matched(patches, sizes, match)
    return torch.cat([x[:, :prefix], patches], dim=1)


def batch_norms(layer: nn.Module) -> list[tuple[str, nn.modules.batchnorm._BatchNorm]]:
    """The layer's BatchNorms with their paths, in registration order (their order in the forward pass)."""
    return [(name, m) for name, m in layer.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def batchnorm_means(model: nn.Module, adapter: ArchAdapter | None = None) -> dict[str, torch.Tensor]:
    """Every layer's BatchNorm running means, keyed as a "batchnorm" reconstruction keys them."""
    return {
        f"layers.{i}.{name}.{RUNNING_MEAN}": norm.running_mean.detach().cpu().clone()
        for i, layer in enumerate((adapter or check_model(model)).layers_of(model))
        for name, norm in batch_norms(layer)
    }


def _recentre_batchnorms(
    model: nn.Module, dense: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]
) -> Reconstruction:
    """Re-estimate the running means of the slim `model`'s BatchNorms (see the module docstring).

    Errors per BatchNorm: Σ over positions of the squared offset of its normalized input's mean
    (n · Σ_c (μ_c - running_mean_c)² / (running_var_c + eps)) before, and after (0: the mean is exact).
    """
    layers, dense_layers = adapter.layers_of(model), adapter.layers_of(dense)
    # a layer that lost a unit or an input channel (pruned residual channels) has other parameter shapes
    changed = [[p.shape for p in s.parameters()] != [p.shape for p in d.parameters()] for s, d in zip(layers, dense_layers)]
    tensors: dict[str, torch.Tensor] = {}
    errors = []
    if not any(changed):
        return Reconstruction("batchnorm", tensors, errors)
    first = changed.index(True)
    device = next(model.parameters()).device
    hidden = [_input_of(layers[first], lambda b=b: scoring_forward(model, b)) for b in batches]
    for i in tqdm(range(first, len(layers)), desc="Reconstruction (batchnorm)", unit="layer"):
        layer = layers[i]
        for name, norm in batch_norms(layer):
            if not norm.num_features:
                continue
            total, count = torch.zeros(norm.num_features, dtype=torch.float64, device=device), 0
            for x in hidden:
                seen = _input_of(norm, lambda x=x: layer(x))
                total += seen.double().sum(dim=[d for d in range(seen.dim()) if d != 1])
                count += seen.numel() // seen.shape[1]
            mean = total / count
            offset = (mean - norm.running_mean.double()).pow(2) / (norm.running_var.double() + norm.eps)
            errors.append((i, name, float(count * offset.sum()), 0.0))
            norm.running_mean.copy_(mean.to(norm.running_mean.dtype))
            tensors[f"layers.{i}.{name}.{RUNNING_MEAN}"] = norm.running_mean.detach().cpu().clone()
        hidden = [_first(layer(x)) for x in hidden]
    return Reconstruction("batchnorm", tensors, errors)


def _first(output: torch.Tensor | tuple) -> torch.Tensor:
    return output[0] if isinstance(output, tuple) else output


@torch.no_grad()
def reconstruct(
    model: nn.Module,
    dense: nn.Module,
    batches: list[dict[str, torch.Tensor]],
    mode: str = "weights",
    ridge: float = 1e-3,
    adapter: ArchAdapter | None = None,
    progress: bool = True,
    refit_convs: bool = True,
    inputs: bool = False,
    masks: PruningMasks | None = None,
    readers: bool = False,
) -> Reconstruction:
    """Refit the slim `model`'s output projections, in place, to rebuild `dense`'s sums on `batches`.

    `dense` is the model before slimming (the same weights and task head); `batches` are padded
    calibration batches (see `data.prepare_calibration`). `mode="batchnorm"` re-estimates the
    BatchNorm running means instead (CNNs). `adapter` is the model's adapter where the caller has it.
    `progress=False` hides the per-layer bar (a caller that refits many trial models shows its own).
    `refit_convs=False` leaves a family's refit conv (`ArchAdapter.refit_conv`) and the modules that read a stage's
    output (`ArchAdapter.link_refits`, refit after the layers in weights mode: `optin_hf.link_refit`) as they are: the
    output projections alone. `inputs=True` (weights mode; `masks`, the masks `model` was slimmed with, say which
    features of each input projection it kept) refits each sublayer's input projections first (module docstring).
    `readers=True` (weights mode, a ResNet; with `refit_convs`) refits every conv that reads a block's input and the
    classifier too, also where the residual widths are kept (`OptinConfig.reconstruct_readers`, module docstring).
    """
    if mode not in REPAIRS:
        raise ValueError(f"reconstruct={mode!r} is not a repair; choose one of {list(REPAIRS)}.")
    adapter = adapter or check_model(model)
    require(adapter, mode, model.config.model_type)  # a refit runs the layer pieces, "batchnorm" needs BatchNorms
    if inputs:
        require(adapter, "inputs", model.config.model_type)
        if mode != "weights" or masks is None:
            raise ValueError("inputs=True refits input projections in mode='weights' and reads which features each "
                             "keeps off the masks the model was slimmed with: pass mode='weights' and masks.")
    if mode == "batchnorm":
        was_training = (model.training, dense.training)
        model.eval()
        dense.eval()
        try:
            consumers = Reconstruction("batchnorm", {}, [])
            if adapter.supports("channels") and adapter.channels_cut(model):  # the means cannot rebuild a cut channel
                consumers = _refit_consumers(model, dense, adapter, batches, ridge)
            repair = _recentre_batchnorms(model, dense, adapter, batches)
            return Reconstruction("batchnorm", {**consumers.tensors, **repair.tensors}, consumers.errors + repair.errors)
        finally:
            model.train(was_training[0])
            dense.train(was_training[1])
    if readers and mode == "weights":
        require(adapter, "readers", model.config.model_type)
    if mode == "weights" and refit_convs and any(adapter.link_refits(model)):  # the layers with what reads a stage (SegFormer)
        return with_links(model, dense, batches, ridge, adapter,
                          lambda: reconstruct(model, dense, batches, mode, ridge, adapter, progress, refit_convs=False,
                                              inputs=inputs, masks=masks))
    # residual channels cut (`prune_channels`): the convs reading them and the classifier are refit too
    cut = adapter.supports("channels") and adapter.channels_cut(model)
    if cut and mode != "weights":
        raise ValueError(f"reconstruct={mode!r} fits one factor per kept unit, which cannot rebuild what the cut residual "
                         "channels carried: use reconstruct='weights' (or 'batchnorm') with prune_channels=True.")
    merging: TokenMerging | None = getattr(model.base_model, "token_merging", None)
    if inputs and merging is not None:
        raise ValueError("inputs=True pairs each input projection's rows in the slim and the dense model, which token "
                         "merging makes differ: refit this token-merged model with inputs=False.")
    was_training = (model.training, dense.training)
    model.eval()
    dense.eval()
    tensors: dict[str, torch.Tensor] = {}
    errors = []
    streams = _streams(dense, adapter, batches, progress)
    pairs = list(zip(adapter.layers_of(model), adapter.layers_of(dense)))
    if cut:  # the slim stem writes fewer channels: the slim stream starts from the slim model's own
        for s in streams:
            s.student = _input_of(pairs[0][0], lambda s=s: scoring_forward(model, s.batch))
    refit_attention = "attn_out" in adapter.refit_sublayers
    conv_path = adapter.refit_conv if mode == "weights" and refit_convs else None
    readers = readers and conv_path is not None  # every conv reading a block's input, and the classifier
    residual_path, residual_side = adapter.ffn_residual()
    for i, (student, teacher) in enumerate(tqdm(pairs, desc=f"Reconstruction ({mode})", unit="layer", disable=not progress)):
        down, ffn_scale = output_projection(adapter, student, "ffn_down"), adapter.branch_scale(student, "ffn_down")
        # the heads' output (the attention output projection's input), where the FFN pieces start
        heads = get_submodule(student, adapter.attn_out) if adapter.supports("heads") else None
        if refit_attention:
            attn, attn_scale = output_projection(adapter, student, "attn_out"), adapter.branch_scale(student, "attn_out")
            eq = NormalEquations(attn.in_features, attn.out_features, attn.device, attn.has_bias,
                                 stacked_theta(attn.weight(), attn.bias(), attn_scale))
        conv_layer = get_submodule(student, conv_path) if conv_path is not None else None
        if conv_layer is not None:  # the heads' output projection, fit before its BatchNorm (module docstring)
            conv = conv_layer.convolution
            conv_eq = NormalEquations(conv.in_channels * math.prod(conv.kernel_size), conv.out_channels, conv.weight.device,
                                      start=_conv_theta(conv))
            conv_kept = adapter.kept_conv_outputs(student).to(conv.weight.device)
        # where the layer outputs its FFN sum, that target is read off the recorded dense run and the dense FFN does
        # not run (not where the slim stream merges tokens or cuts channels, or a conv is refit: their own targets)
        recorded_sum = adapter.output_is_ffn_sum and merging is None and not cut and conv_layer is None
        dense_taps = {
            "r_ffn": (get_submodule(teacher, residual_path), residual_side),
            **({} if recorded_sum else {"y_ffn": (output_projection(adapter, teacher, "ffn_down").output_module, "out")}),
            **({"y_attn": (get_submodule(teacher, adapter.attn_out), "out")} if refit_attention else {}),
            **({"y_conv": (get_submodule(teacher, conv_path).convolution, "out")} if conv_layer is not None else {}),
        }
        if cut or readers:  # the convs reading the (cut) residual stream, before anything they feed
            errors += _refit_readers(adapter, student, teacher, _readers(adapter, student, teacher, every=readers), streams,
                                     i, ridge, tensors)
        # the units the layer keeps, as `slim_model` cut them
        keep = (masks.head_mask[i].nonzero().flatten(), masks.neuron_mask[i].nonzero().flatten()) if inputs else None
        if inputs:  # the dense layer runs once, for its sums and its input projections' inputs (keyed "in:" + path)
            attn_inputs = _inputs_of(adapter, student, teacher, dense.config, "attn_out", keep[0]) if heads is not None and len(keep[0]) else {}
            ffn_inputs = _inputs_of(adapter, student, teacher, dense.config, "ffn_down", keep[1]) if len(keep[1]) else {}
            input_taps = {f"in:{p}": (x.dense, "in") for p, x in {**attn_inputs, **ffn_inputs}.items()}
            for s in streams:  # no token merging here (refused above): the student's call is the recorded one
                s.dense = _dense_layer(teacher, s.teacher, s.calls[i].args, s.calls[i].kwargs, {**dense_taps, **input_taps},
                                       not recorded_sum, [x.dense for x in ffn_inputs.values()])
        if inputs and attn_inputs:  # the heads' input projections, before the heads run
            seen = ((_watch_inputs({p: get_submodule(student, p) for p in attn_inputs},
                                   lambda s=s: student(s.student, *s.calls[i].args, **s.calls[i].kwargs)),
                     {p: s.dense[f"in:{p}"] for p in attn_inputs}, s.real) for s in streams)
            errors += _refit_inputs(attn_inputs, seen, ridge, i, tensors)
        for s in streams:
            before = s.sizes
            if merging is not None:
                merging.sizes = before  # the patch sizes of this batch, where its merge left them
            taps = {"x": (heads, "in")} if heads is not None else {}
            seen = _call(student, s.student, s.calls[i].args, s.calls[i].kwargs, taps, stop="x" if taps else "layer")
            s.student, s.x, s.call = seen["layer"], seen.get("x"), seen["layer_args"]
            if merging is not None:
                s.sizes, s.teacher = merging.sizes, _merge_like(s.teacher, before, merging)
            t = s.dense if inputs else _dense_layer(teacher, s.teacher, *s.call, dense_taps, not recorded_sum)
            if conv_layer is not None:
                y_conv = map_rows(t["y_conv"][:, conv_kept])
                conv_eq.add(patches(conv, s.x, y_conv.shape[0] // s.x.shape[0]), y_conv, None)
            if refit_attention:
                y_attn = t["y_attn"] if attn_scale is None else t["y_attn"] * attn_scale.to(t["y_attn"].dtype)
                # rows in the residual's token order (Swin runs the projection on its windows' rows)
                args, kwargs = s.call
                x, y_attn = adapter.token_order(student, s.x, *args, **kwargs), adapter.token_order(teacher, y_attn, *args, **kwargs)
                eq.add(attn.rows(x), attn.rows(y_attn + s.teacher - s.student), s.real)
            output = _recorded_output(s.calls, i) if recorded_sum else t["output"]
            s.teacher = output if adapter.chained_layers or i + 1 == len(pairs) else s.calls[i + 1].hidden
            # the dense FFN sum (a ResNet block's pre-activation sum) as rows of the down projection's output
            if recorded_sum:
                s.target = adapter.stream_rows(teacher, "ffn_down", output)
            else:
                y_ffn = t["y_ffn"] if ffn_scale is None else t["y_ffn"] * ffn_scale.to(t["y_ffn"].dtype)  # as the residual adds it
                s.target = down.rows(y_ffn) + adapter.stream_rows(teacher, "ffn_down", t["r_ffn"])
            if cut:  # at the residual channels the slim block writes
                s.target = s.target[:, adapter.kept_block_outputs(student).to(s.target.device)]
        if conv_layer is not None and conv.out_channels:
            errors.append((i, conv_path, *_refit_conv(conv_layer, conv_eq, ridge)))
            tensors.update(refit_conv_tensors(student, i, adapter))
        if refit_attention:
            unit = adapter.layer_head_dim(student, model.config) if adapter.kept_heads(student, model.config) else 1
            errors.append((i, "attn_out", *_refit(attn, eq, mode, ridge, unit, f"layers.{i}.attn_out", tensors, attn_scale)))

        if inputs and ffn_inputs:  # the FFN's input projections, from the slim FFN input the attention's refit left

            def ffn_input(s: _Stream) -> dict[str, torch.Tensor]:
                args, kwargs = s.call
                s.residual = adapter.finish_attention(student, s.x, s.student, *args, **kwargs)  # the FFN's refit reuses it
                return _watch_inputs({p: get_submodule(student, p) for p in ffn_inputs},
                                     lambda: adapter.feed_forward(student, s.residual, *args, **kwargs))

            seen = ((ffn_input(s), {p: s.dense[f"in:{p}"] for p in ffn_inputs}, s.real) for s in streams)
            errors += _refit_inputs(ffn_inputs, seen, ridge, i, tensors)
        eq = NormalEquations(down.in_features, down.out_features, down.device, down.has_bias,
                             stacked_theta(down.weight(), down.bias(), ffn_scale))
        residual = get_submodule(student, residual_path)
        for s in streams:  # the rest of the layer in pieces, from the heads' output: no attention rerun
            args, kwargs = s.call

            def run(s=s, args=args, kwargs=kwargs) -> None:
                if s.residual is None:  # else the FFN input refit's watch computed it, from the same refit attention
                    s.residual = adapter.finish_attention(student, s.x, s.student, *args, **kwargs)
                adapter.feed_forward(student, s.residual, *args, **kwargs)

            seen = _watch({"x": (down.module, "in"), "r": (residual, residual_side)}, run)
            s.x = seen["x"]
            eq.add(down.rows(s.x), s.target - adapter.stream_rows(student, "ffn_down", seen["r"]), s.real)
        errors.append((i, "ffn_down", *_refit(down, eq, mode, ridge, 1, f"layers.{i}.ffn_down", tensors, ffn_scale)))

        for s in streams:
            args, kwargs = s.call
            s.student = adapter.finish_feed_forward(student, down(s.x), s.residual, *args, **kwargs)
            if not adapter.chained_layers and i + 1 < len(pairs):  # what the model runs between the layers
                s.student = _next_input(model, adapter, i, s.student, s)
            s.x = s.residual = s.target = s.call = s.dense = None
        release_freed_memory()  # this layer's sums and activations, before the next layer's are made
    if cut or readers:
        errors += _refit_classifier(model, dense, adapter, streams, ridge, tensors, every=readers)
    model.train(was_training[0])
    dense.train(was_training[1])
    return Reconstruction(mode, tensors, errors)


def save_reconstruction(reconstruction: Reconstruction, path: str | os.PathLike) -> None:
    save_file(reconstruction.tensors, str(path), metadata={"format": "optin-reconstruction-v1", "mode": reconstruction.mode})


def load_reconstruction(model: nn.Module, path: str | os.PathLike, adapter: ArchAdapter | None = None) -> None:
    """Apply a saved reconstruction to the slim `model` (slimmed from the same base with the same masks)."""
    apply_reconstruction(model, load_safetensors(path, "reconstruction"), str(path), adapter)


def _destination(
    model: nn.Module, adapter: ArchAdapter, key: str
) -> tuple[nn.Module | Projection, str, tuple[int, ...]] | None:
    """Where a reconstruction tensor goes: (a BatchNorm or an output projection, what it sets, the shape
    it must have; a weight is an [out, in] matrix); None if nowhere."""
    layers = adapter.layers_of(model)
    parts = key.split(".")
    if parts[0] == LINKS:  # a module that reads a stage's output (`optin_hf.link_refit`)
        return link_destination(model, adapter, key)
    classifier = adapter.channel_classifier(model) if adapter.supports("channels") else None
    if classifier is not None and key in ("classifier.weight", "classifier.bias"):  # refit over cut residual channels
        proj = Projection(classifier)
        return (proj, "weight", (proj.out_features, proj.in_features)) if parts[1] == "weight" else (proj, "bias", (proj.out_features,))
    if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(layers):
        return None
    layer = layers[int(parts[1])]
    conv_paths = [adapter.refit_conv] if adapter.refit_conv is not None else []
    conv_paths += list(adapter.channel_readers) if adapter.supports("channels") else []
    path = ".".join(parts[2:])
    if path.endswith(f".{CONV_WEIGHT}") and path[: -len(CONV_WEIGHT) - 1] in conv_paths:
        conv = getattr(get_submodule(layer, path[: -len(CONV_WEIGHT) - 1]), "convolution", None)
        return (conv, CONV_WEIGHT, tuple(conv.weight.shape)) if conv is not None else None
    if parts[-1] == RUNNING_MEAN:
        norm = dict(batch_norms(layer)).get(".".join(parts[2:-1]))
        return (norm, RUNNING_MEAN, (norm.num_features,)) if norm is not None else None
    if parts[2] == INPUTS and parts[-1] in ("weight", "bias"):  # an input projection (`reconstruct_inputs`)
        if ".".join(parts[3:-1]) not in _input_paths(adapter, layer, model.config):
            return None
        proj = Projection(get_submodule(layer, ".".join(parts[3:-1])))
        if parts[-1] == "bias":
            return (proj, "bias", (proj.out_features,)) if proj.has_bias else None
        return proj, "weight", (proj.out_features, proj.in_features)
    if len(parts) != 4 or parts[2] not in adapter.refit_sublayers or parts[3] not in ("weight", "bias", "scale"):
        return None
    proj = output_projection(adapter, layer, parts[2])
    if parts[3] == "scale":
        unit = adapter.layer_head_dim(layer, model.config) if parts[2] == "attn_out" and proj.in_features else 1
        return proj, "scale", (proj.in_features // unit,)
    if parts[3] == "bias":
        return (proj, "bias", (proj.out_features,)) if proj.has_bias else None
    return proj, "weight", (proj.out_features, proj.in_features)


def _input_paths(adapter: ArchAdapter, layer: nn.Module, config) -> set[str]:
    """The paths of the (slim) `layer`'s input projections that `reconstruct_inputs` may have refit: those of its
    heads where it keeps one, those of its FFN where it keeps a neuron."""
    if not adapter.supports("inputs"):
        return set()
    subs = (["attn_out"] if adapter.supports("heads") and adapter.kept_heads(layer, config) else [])
    subs += ["ffn_down"] if adapter.kept_neurons(layer) else []
    return {part.path for sub in subs for part in adapter.input_slices(layer, config, sub)}


@torch.no_grad()
def apply_reconstruction(
    model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the reconstruction", adapter: ArchAdapter | None = None
) -> None:
    """Set the refit weights (or multiply in the scales, or set the BatchNorm means) that `Reconstruction.tensors`
    holds. `adapter`: the model's, where the caller has it."""
    adapter = adapter or check_model(model)
    for key, value in sorted(tensors.items()):
        destination = _destination(model, adapter, key)
        if destination is None:
            raise ValueError(f"{source} holds {key!r}, which is not a reconstruction tensor of this model.")
        module, name, expected = destination
        if tuple(value.shape) != expected:
            raise ValueError(
                f"{source}: {key} has shape {tuple(value.shape)} but the slim model needs {expected}; "
                "it was made for other masks or another base model."
            )
        if name == RUNNING_MEAN:
            module.running_mean.copy_(value.to(module.running_mean))
        elif name == CONV_WEIGHT:
            module.weight.copy_(value.to(module.weight))
        elif name == "scale":
            module.set(scale_columns(module.weight(), value.to(module.device)), None)
        elif name == "weight":
            module.set(value.to(module.device).clone(), None)
        else:
            module.set(module.weight(), value.to(module.device).clone())


@torch.no_grad()
def unslim(model: nn.Module, dense: nn.Module, masks: PruningMasks, adapter: ArchAdapter | None = None) -> nn.Module:
    """A copy of `dense` that computes what the slim, reconstructed `model` computes.

    The removed units' input features of each output projection are zero and the kept ones carry
    the refit weights (a projection the refit leaves keeps its own); the input projections carry the slim ones' rows
    at the features they keep (`reconstruct_inputs`); a refit conv (`ArchAdapter.refit_conv`)
    carries its refit filters at its kept (input, output) channels and its BatchNorm's refit means, so the
    scoring engine, which runs dense shapes, can score the repaired model. `adapter` is the model's
    adapter where the caller has it.
    """
    adapter = adapter or check_model(model)
    copy_ = copy.deepcopy(dense)
    geometry = adapter.layer_geometry(dense.config)
    # a ResNet's convs reading each block's input and its classifier, as `reconstruct_readers` may have refit them
    readers = adapter.supports("readers") and not adapter.channels_cut(model)
    for i, (slim_layer, layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(copy_))):
        g = geometry[i]
        kept = {"attn_out": masks.head_mask[i][: g.heads].repeat_interleave(g.head_dim), "ffn_down": masks.neuron_mask[i][: g.neurons]}
        for sub in [sub for sub in ("attn_out", "ffn_down") if kept[sub].numel()]:
            if sub not in adapter.refit_sublayers:  # not refit: the removed units' inputs only are cut
                module = get_submodule(layer, getattr(adapter, sub))
                removed = (~kept[sub]).nonzero().flatten().to(module.weight.device)
                module.weight.data.index_fill_(feature_dim(module, "in"), removed, 0.0)
                continue
            source, target = output_projection(adapter, slim_layer, sub), output_projection(adapter, layer, sub)
            weight = torch.zeros_like(target.weight())
            weight[:, kept[sub].to(weight.device)] = source.weight()
            target.set(weight, source.bias())
        if adapter.refit_conv is not None and kept["attn_out"].numel():  # from the heads to the neurons
            source, target = get_submodule(slim_layer, adapter.refit_conv), get_submodule(layer, adapter.refit_conv)
            ins = kept["attn_out"].nonzero().flatten().to(target.convolution.weight.device)
            outs = kept["ffn_down"].nonzero().flatten().to(ins.device)  # its outputs are the block's kept neurons
            target.convolution.weight.data[outs[:, None], ins[None, :]] = source.convolution.weight.detach()
            target.normalization.running_mean[outs] = source.normalization.running_mean
        if readers:  # at the channels each keeps (the reduce conv: the kept heads)
            for path in _readers(adapter, slim_layer, layer, every=True):
                source, target = get_submodule(slim_layer, path), get_submodule(layer, path)
                outs = adapter.kept_reader_outputs(slim_layer, path).to(target.convolution.weight.device)
                target.convolution.weight.data[outs] = source.convolution.weight.detach()
                target.normalization.running_mean[outs] = source.normalization.running_mean
        if adapter.supports("inputs"):  # the input projections at the features they keep (refit or not)
            for sub, keep in (("attn_out", masks.head_mask[i]), ("ffn_down", masks.neuron_mask[i])):
                keep = keep.nonzero().flatten()
                for x in _inputs_of(adapter, slim_layer, layer, dense.config, sub, keep).values() if len(keep) else ():
                    target = Projection(x.dense)
                    weight, bias = target.weight().clone(), target.bias()
                    weight[x.kept] = x.proj.weight()
                    if bias is not None:
                        bias = bias.clone()
                        bias[x.kept] = x.proj.bias()
                    target.set(weight, bias)
    classifier = adapter.channel_classifier(model) if readers else None
    if classifier is not None:
        adapter.channel_classifier(copy_).load_state_dict(classifier.state_dict())
    copy_links(model, copy_, adapter)
    return copy_
