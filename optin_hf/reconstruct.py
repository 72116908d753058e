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
- `AᵀA` and `AᵀY` are accumulated in float64 batch by batch, so memory does not grow with the
  calibration size, and the refit solves `(AᵀA + λI) θ = AᵀY + λ θ₀` with
  `λ = ridge · mean(diag(AᵀA))`: a ridge toward the weights the kept units had (θ₀), so a
  small calibration set moves them little, nothing pruned changes nothing, and the refit's
  error on the calibration data never exceeds θ₀'s.
- `mode="weights"` refits the weight and bias (K-prune's knowledge-preserving weight tuning);
  `mode="scales"` fits one factor per kept head or neuron with the bias fixed (PTF's mask
  tuning), a far smaller artifact. A sublayer that keeps nothing refits its bias only.

Token-merged ViTs: the dense stream is merged with the pruned model's own matches, so both
streams hold the same tokens.

CNNs with BatchNorm (ResNet) have no output projection to refit through; `mode="batchnorm"`
repairs them instead. A removed channel is a post-ReLU output with a positive mean, so removing
it shifts the next conv's output by its mean times the conv's weights, and an eval-mode
BatchNorm, whose running statistics are fixed, passes that shift on; many removed channels'
shifts add up and carry into later blocks. So, from the first block that lost a channel on, each
BatchNorm's running mean is re-estimated as the exact mean of what it receives on the
calibration data in the slim model in eval mode, BatchNorm by BatchNorm in forward order (each
one measured with the earlier ones already re-centred: the statistics the repaired model really
meets). The running variances are kept: re-estimating them too (also BatchNorm train-mode
passes with cumulative averages) scaled up channels that pruning left near-constant and did worse
on a development split (`benchmarks/RESULTS.md`). The artifact is the new running means.
"""

from __future__ import annotations

import copy
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from .arch import REPAIRS, ArchAdapter, check_model, get_submodule, require
from .masks import PruningMasks, load_safetensors
from .tokens import TokenMerging, merge_matched

RECONSTRUCTION_NAME = "optin_reconstruction.safetensors"
SUBLAYERS = ("attn_out", "ffn_down")
RUNNING_MEAN = "running_mean"


class _Stop(Exception):
    """Ends a layer call once the hooks saw what they need."""


def output_projection(adapter: ArchAdapter, layer: nn.Module, sublayer: str) -> nn.Linear:
    """The attention output (`attn_out`) or FFN down (`ffn_down`) projection of a layer."""
    return get_submodule(layer, getattr(adapter, sublayer))


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
            seen[name] = output[0] if isinstance(output, tuple) else output
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


def _input_of(module: nn.Module, run: Callable[[], object]) -> torch.Tensor:
    """The first input `module` receives while `run()` runs; the run stops there."""
    seen = []

    def hook(module, args):
        seen.append(args[0])
        raise _Stop

    handle = module.register_forward_pre_hook(hook)
    try:
        run()
    except _Stop:
        pass
    finally:
        handle.remove()
    return seen[0]


@dataclass
class _Stream:
    """One calibration batch moving through both models, a layer at a time.

    student / teacher: [batch, tokens, hidden], the current layer's input in the pruned and the
    dense model; real: bool [batch * tokens] of the rows that are real tokens (None: all);
    sizes: patch sizes [batch, patches, 1] of the merged tokens so far, when tokens merge;
    target: the dense FFN sum of the layer in progress; x, residual: the pruned model's input of
    the projection being refit and the residual it adds to.
    """

    student: torch.Tensor
    teacher: torch.Tensor
    args: tuple
    kwargs: dict
    real: torch.Tensor | None
    sizes: torch.Tensor | None = None
    target: torch.Tensor | None = None
    x: torch.Tensor | None = None
    residual: torch.Tensor | None = None


class _NormalEquations:
    """AᵀA and AᵀY (A = [x, 1]) and Σ|Y|², in float64, over real token rows."""

    def __init__(self, width: int, hidden: int, device: torch.device):
        self.gram = torch.zeros(width + 1, width + 1, dtype=torch.float64, device=device)
        self.cross = torch.zeros(width + 1, hidden, dtype=torch.float64, device=device)
        self.target_sq = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, target: torch.Tensor, real: torch.Tensor | None) -> None:
        rows = target.shape[:-1].numel()
        x, target = x.reshape(rows, x.shape[-1]).double(), target.reshape(rows, target.shape[-1]).double()
        if real is not None:
            x, target = x[real], target[real]
        a = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1)
        self.gram += a.T @ a
        self.cross += a.T @ target
        self.target_sq += target.pow(2).sum()

    def error(self, theta: torch.Tensor) -> float:
        """Σ|Aθ - Y|² from the accumulated sums; θ: [width + 1, hidden]."""
        return float((theta * (self.gram @ theta)).sum() - 2 * (theta * self.cross).sum() + self.target_sq)


def _solve_weights(eq: _NormalEquations, theta0: torch.Tensor, ridge: float) -> torch.Tensor:
    lam = ridge * eq.gram.diagonal().mean()
    eye = torch.eye(eq.gram.shape[0], dtype=eq.gram.dtype, device=eq.gram.device)
    return torch.linalg.solve(eq.gram + lam * eye, eq.cross + lam * theta0)


def _solve_scales(eq: _NormalEquations, weight: torch.Tensor, bias: torch.Tensor, unit: int, ridge: float) -> torch.Tensor:
    """One factor per unit of `unit` input columns, the bias fixed: [units].

    Unit u contributes z_u = W[:, u] x_u, so Σ<z_u, z_v> is the block sum of (WᵀW) ⊙ (xᵀx) and
    Σ<z_u, Y - b> that of Σ_o W[o, j] (xᵀY - (Σx) bᵀ)[j, o]; the ridge pulls toward 1.
    """
    width = weight.shape[1]
    w = weight.double()
    xx, x1 = eq.gram[:width, :width], eq.gram[:width, width]
    residual = eq.cross[:width] - x1[:, None] * bias.double()[None, :]
    units = torch.arange(width, device=w.device) // unit
    pick = nn.functional.one_hot(units).to(w.dtype)  # [width, units]
    gram = pick.T @ ((w.T @ w) * xx) @ pick
    rhs = pick.T @ (w * residual.T).sum(0)
    lam = ridge * gram.diagonal().mean()
    eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
    return torch.linalg.solve(gram + lam * eye, rhs + lam)


@dataclass
class Reconstruction:
    """What a reconstruction changed. tensors: the artifact (`layers.{i}.{sublayer}.weight/bias`
    in weights mode, `.scale` [kept units] in scales mode, `layers.{i}.{path}.running_mean` of a
    BatchNorm in batchnorm mode); errors: (layer, sublayer or BatchNorm path, error before, error
    after) on the calibration tokens, Σ of squared differences to the target."""

    mode: str
    tensors: dict[str, torch.Tensor]
    errors: list[tuple[int, str, float, float]]


def _refit(
    proj: nn.Linear, eq: _NormalEquations, mode: str, ridge: float, unit: int, key: str, tensors: dict,
    branch: torch.Tensor | None = None,
) -> tuple[float, float]:
    """Refit `proj` (in place) from its normal equations; record the artifact under `key`; the
    calibration error (before, after). Every output projection here has a bias. `branch`: the
    per-channel factor [hidden] on the projection's output before the residual adds it (a layer
    scale, `ArchAdapter.branch_scale`), or None; with it the equations' target is in the residual
    stream's units and the refit solves for the scaled projection, then divides the factor out."""
    weight, bias = proj.weight.detach(), proj.bias.detach()
    if branch is None:
        theta = lambda w, b: torch.cat([w.T, b[None]]).double()  # noqa: E731
    else:
        branch = branch.double()
        theta = lambda w, b: torch.cat([w.T, b[None]]).double() * branch[None, :]  # noqa: E731
    before = eq.error(theta(weight, bias))
    if mode == "weights":
        solved = _solve_weights(eq, theta(weight, bias), ridge)
        if branch is not None:
            solved = solved / branch[None, :]
        weight, bias = solved[:-1].T.to(weight.dtype).contiguous(), solved[-1].to(bias.dtype)
        tensors[f"{key}.weight"], tensors[f"{key}.bias"] = weight.cpu(), bias.cpu()
        proj.bias = nn.Parameter(bias, requires_grad=proj.bias.requires_grad)
    elif proj.in_features:
        if branch is None:
            scale = _solve_scales(eq, weight, bias, unit, ridge).to(weight.dtype)
        else:
            scaled = theta(weight, bias)
            scale = _solve_scales(eq, scaled[:-1].T, scaled[-1], unit, ridge).to(weight.dtype)
        tensors[f"{key}.scale"] = scale.cpu()
        weight = scale_columns(weight, scale)
    proj.weight = nn.Parameter(weight, requires_grad=proj.weight.requires_grad)
    return before, eq.error(theta(weight, bias))


def scale_columns(weight: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """weight [out, units * w] with each unit's w input columns multiplied by its factor in scale [units]."""
    return weight * scale.to(weight.dtype).repeat_interleave(weight.shape[1] // max(len(scale), 1))[None, :]


def _streams(teacher: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]]) -> list[_Stream]:
    """Each batch's layer-0 call in the dense model; the pruned model starts from the same input."""
    device = next(teacher.parameters()).device
    first = adapter.layers_of(teacher)[0]
    streams = []
    for batch in batches:
        seen: dict = {}

        def hook(module, args, kwargs):
            seen["call"] = (args[0], tuple(args[1:]), dict(kwargs))
            raise _Stop

        handle = first.register_forward_pre_hook(hook, with_kwargs=True)
        try:
            teacher(**{k: v.to(device) for k, v in batch.items()})
        except _Stop:
            pass
        finally:
            handle.remove()
        hidden, args, kwargs = seen["call"]
        real = batch["attention_mask"].reshape(-1).bool().to(device) if "attention_mask" in batch else None
        streams.append(_Stream(hidden, hidden, args, kwargs, real))
    return streams


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
    config = model.config
    layers, dense_layers = adapter.layers_of(model), adapter.layers_of(dense)
    changed = [
        adapter.kept_heads(s, config) != adapter.kept_heads(d, dense.config) or adapter.kept_neurons(s) != adapter.kept_neurons(d)
        for s, d in zip(layers, dense_layers)
    ]
    tensors: dict[str, torch.Tensor] = {}
    errors = []
    if not any(changed):
        return Reconstruction("batchnorm", tensors, errors)
    first = changed.index(True)
    device = next(model.parameters()).device
    hidden = [_input_of(layers[first], lambda b=b: model(**{k: v.to(device) for k, v in b.items()})) for b in batches]
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
) -> Reconstruction:
    """Refit the slim `model`'s output projections, in place, to rebuild `dense`'s sums on `batches`.

    `dense` is the model before slimming (the same weights and task head); `batches` are padded
    calibration batches (see `data.prepare_calibration`). `mode="batchnorm"` re-estimates the
    BatchNorm running means instead (CNNs). `adapter` is the model's adapter where the caller has it.
    """
    if mode not in REPAIRS:
        raise ValueError(f"reconstruct={mode!r} is not a repair; choose one of {list(REPAIRS)}.")
    adapter = adapter or check_model(model)
    require(adapter, mode, model.config.model_type)  # a refit runs the layer pieces, "batchnorm" needs BatchNorms
    if mode == "batchnorm":
        was_training = (model.training, dense.training)
        model.eval()
        dense.eval()
        try:
            return _recentre_batchnorms(model, dense, adapter, batches)
        finally:
            model.train(was_training[0])
            dense.train(was_training[1])
    head_dim = adapter.head_dim(model.config)
    merging: TokenMerging | None = getattr(model.base_model, "token_merging", None)
    was_training = (model.training, dense.training)
    model.eval()
    dense.eval()
    hidden = model.config.hidden_size
    tensors: dict[str, torch.Tensor] = {}
    errors = []
    streams = _streams(dense, adapter, batches)
    pairs = list(zip(adapter.layers_of(model), adapter.layers_of(dense)))
    for i, (student, teacher) in enumerate(tqdm(pairs, desc=f"Reconstruction ({mode})", unit="layer")):
        attn, down = output_projection(adapter, student, "attn_out"), output_projection(adapter, student, "ffn_down")
        attn_scale, ffn_scale = adapter.branch_scale(student, "attn_out"), adapter.branch_scale(student, "ffn_down")

        eq = _NormalEquations(attn.in_features, hidden, attn.weight.device)
        for s in streams:
            before = s.sizes
            if merging is not None:
                merging.sizes = before  # the patch sizes of this batch, where its merge left them
            seen = _call(student, s.student, s.args, s.kwargs, {"x": (attn, "in")}, stop="x")
            s.student, s.x, (args, kwargs) = seen["layer"], seen["x"], seen["layer_args"]
            if merging is not None:
                s.sizes, s.teacher = merging.sizes, _merge_like(s.teacher, before, merging)
            t = _call(teacher, s.teacher, args, kwargs, {
                "y_attn": (get_submodule(teacher, adapter.attn_out), "out"),
                "r_ffn": (get_submodule(teacher, adapter.ffn_input), "in"),
                "y_ffn": (get_submodule(teacher, adapter.ffn_down), "out"),
            })
            y_attn, y_ffn = t["y_attn"], t["y_ffn"]
            if attn_scale is not None:  # the dense branches as the residual adds them
                y_attn = y_attn * attn_scale.to(y_attn.dtype)
            if ffn_scale is not None:
                y_ffn = y_ffn * ffn_scale.to(y_ffn.dtype)
            eq.add(s.x, y_attn + s.teacher - s.student, s.real)
            s.teacher, s.target = t["output"], y_ffn + t["r_ffn"]
        errors.append((i, "attn_out", *_refit(attn, eq, mode, ridge, head_dim, f"layers.{i}.attn_out", tensors, attn_scale)))

        eq = _NormalEquations(down.in_features, hidden, down.weight.device)
        for s in streams:  # the rest of the layer in pieces, from the heads' output: no attention rerun
            s.residual = adapter.finish_attention(student, s.x, s.student)
            s.x = _input_of(down, lambda: adapter.feed_forward(student, s.residual))
            eq.add(s.x, s.target - s.residual, s.real)
        errors.append((i, "ffn_down", *_refit(down, eq, mode, ridge, 1, f"layers.{i}.ffn_down", tensors, ffn_scale)))

        for s in streams:
            s.student = adapter.finish_feed_forward(student, down(s.x), s.residual)
            s.x = s.residual = s.target = None
    model.train(was_training[0])
    dense.train(was_training[1])
    return Reconstruction(mode, tensors, errors)


def save_reconstruction(reconstruction: Reconstruction, path: str | os.PathLike) -> None:
    save_file(reconstruction.tensors, str(path), metadata={"format": "optin-reconstruction-v1", "mode": reconstruction.mode})


def load_reconstruction(model: nn.Module, path: str | os.PathLike) -> None:
    """Apply a saved reconstruction to the slim `model` (slimmed from the same base with the same masks)."""
    apply_reconstruction(model, load_safetensors(path, "reconstruction"), str(path))


def _destination(model: nn.Module, adapter: ArchAdapter, key: str) -> tuple[nn.Module, str, tuple[int, ...]] | None:
    """Where a reconstruction tensor goes: (module, attribute, the shape it must have); None if nowhere."""
    layers = adapter.layers_of(model)
    parts = key.split(".")
    if len(parts) < 4 or parts[0] != "layers" or not parts[1].isdigit() or int(parts[1]) >= len(layers):
        return None
    layer = layers[int(parts[1])]
    if parts[-1] == RUNNING_MEAN:
        norm = dict(batch_norms(layer)).get(".".join(parts[2:-1]))
        return (norm, RUNNING_MEAN, (norm.num_features,)) if norm is not None else None
    if len(parts) != 4 or parts[2] not in SUBLAYERS or parts[3] not in ("weight", "bias", "scale"):
        return None
    proj = output_projection(adapter, layer, parts[2])
    if parts[3] == "scale":
        unit = adapter.head_dim(model.config) if parts[2] == "attn_out" else 1
        return proj, "scale", (proj.in_features // unit,)
    return proj, parts[3], tuple(getattr(proj, parts[3]).shape)


@torch.no_grad()
def apply_reconstruction(model: nn.Module, tensors: dict[str, torch.Tensor], source: str = "the reconstruction") -> None:
    """Set the refit weights (or multiply in the scales, or set the BatchNorm means) that `Reconstruction.tensors` holds."""
    adapter = check_model(model)
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
        elif name == "scale":
            module.weight = nn.Parameter(scale_columns(module.weight.detach(), value.to(module.weight.device)), requires_grad=module.weight.requires_grad)
        else:
            old = getattr(module, name)
            setattr(module, name, nn.Parameter(value.to(device=old.device, dtype=old.dtype).clone(), requires_grad=old.requires_grad))


@torch.no_grad()
def unslim(model: nn.Module, dense: nn.Module, masks: PruningMasks, adapter: ArchAdapter | None = None) -> nn.Module:
    """A copy of `dense` that computes what the slim, reconstructed `model` computes.

    The removed units' columns of each output projection are zero and the kept ones carry the
    refit weights, so the scoring engine, which runs dense shapes, can score the repaired model.
    `adapter` is the model's adapter where the caller has it.
    """
    adapter = adapter or check_model(model)
    head_dim = adapter.head_dim(model.config)
    copy_ = copy.deepcopy(dense)
    for i, (slim_layer, layer) in enumerate(zip(adapter.layers_of(model), adapter.layers_of(copy_))):
        kept = {"attn_out": masks.head_mask[i].repeat_interleave(head_dim), "ffn_down": masks.neuron_mask[i]}
        for sub in SUBLAYERS:
            source, target = output_projection(adapter, slim_layer, sub), get_submodule(layer, getattr(adapter, sub))
            target.weight.zero_()
            target.weight[:, kept[sub].to(target.weight.device)] = source.weight
            target.bias.copy_(source.bias)
    return copy_
