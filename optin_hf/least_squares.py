"""Ridge least squares from accumulated normal equations: what every refit solves (`optin_hf.reconstruct` for the
layers, `optin_hf.link_refit` for the modules between them, `optin_hf.refit_selection` for the units to keep).

Each refit accumulates AᵀA and AᵀY over calibration rows into float64 sums (`NormalEquations`, from float32 products
against the residual of the weights it starts from), so its memory is the width squared, whatever the number of rows,
and the error of any θ follows in closed form."""

from __future__ import annotations

import torch
from torch import nn


GRAM_BLOCKS = 4  # column blocks of `gram`'s upper triangle


def gram(a: torch.Tensor) -> torch.Tensor:
    """aᵀa ([rows, n] -> [n, n]) from its upper block triangle, each lower block the transpose of its mirror: 10 of the
    16 block products (torch has no symmetric rank-k product). On the language-model default's 577 and 1,536 widths
    it takes about a fifth less time than one full product (benchmarks/RESULTS.md, s43), and it is exactly symmetric."""
    n = a.shape[1]
    if n < 64 * GRAM_BLOCKS:
        return a.T @ a
    edges = [round(i * n / GRAM_BLOCKS) for i in range(GRAM_BLOCKS + 1)]
    out = a.new_empty(n, n)
    for lo, hi in zip(edges, edges[1:]):
        out[lo:hi, lo:] = a[:, lo:hi].T @ a[:, lo:]
        out[hi:, lo:hi] = out[lo:hi, hi:].T
    return out


class NormalEquations:
    """AᵀA, Aᵀ(Y - Aθ₀) and |Y - Aθ₀|² (A = [x, 1], or A = x for a projection without a bias) in float64, over real
    token rows, where θ₀ (`start`: the weights the refit starts from, zeros where None) is fixed when they are built.

    Each batch's products are taken in float32 (float64 inputs stay float64) and summed into the float64 totals.
    They are taken against the residual Y - Aθ₀ rather than Y, so their rounding is relative to what θ₀ leaves
    unexplained, not to Y: a refit with nothing to repair returns θ₀ exactly, and the small errors left after a refit
    are still resolved (`error`). The residual costs one more float32 product (Aθ₀), so the sums take about 80% of the
    float64 products' time (measured on the language-model default's refit, benchmarks/RESULTS.md, s39)."""

    def __init__(self, width: int, hidden: int, device: torch.device, bias: bool = True, start: torch.Tensor | None = None):
        self.bias = bias
        width += int(bias)
        zeros = start is None
        self.start = torch.zeros(width, hidden, dtype=torch.float64, device=device) if zeros else start.to(device, torch.float64)
        self._start_rows = None if zeros else {}  # θ₀ in each input dtype seen, for the per-batch residual
        self.gram = torch.zeros(width, width, dtype=torch.float64, device=device)
        self.residual_cross = torch.zeros(width, hidden, dtype=torch.float64, device=device)
        self.residual_sq = torch.zeros((), dtype=torch.float64, device=device)

    def add(self, x: torch.Tensor, target: torch.Tensor, real: torch.Tensor | None) -> None:
        """x [rows, width] and target [rows, hidden], rows in the same order; real: bool [rows] or None."""
        if real is not None:
            x, target = x[real], target[real]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x, target = x.to(dtype), target.to(dtype)
        a = torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1) if self.bias else x
        if self._start_rows is not None:
            if dtype not in self._start_rows:
                self._start_rows[dtype] = self.start.to(dtype)
            target = target - a @ self._start_rows[dtype]
        self.gram += gram(a).double()
        self.residual_cross += (a.T @ target).double()
        self.residual_sq += target.pow(2).sum(dtype=torch.float64)

    @property
    def cross(self) -> torch.Tensor:
        """AᵀY."""
        return self.residual_cross + self.gram @ self.start

    def error(self, theta: torch.Tensor) -> float:
        """Σ|Aθ - Y|² from the accumulated sums; θ: [width (+ 1 with a bias), hidden]."""
        delta = theta - self.start
        return float((delta * (self.gram @ delta)).sum() - 2 * (delta * self.residual_cross).sum() + self.residual_sq)


class DriftEquations:
    """The normal equations of a fit from x to a linear map of another input, x_d θ_d (an input projection's dense
    twin on the dense stream), kept as three width² sums: AᵀA, AᵀΔ and ΔᵀΔ with Δ = [x_d - x, 0] (A = [x, 1], or x
    without a bias). Their cost does not grow with θ_d's outputs (the sums of `NormalEquations` would be as wide as
    the 2,000 gate and up rows a SmolLM2 layer keeps), and where nothing drifted (x_d = x, θ_d = θ₀) they are exactly
    zero but AᵀA, so the fit returns θ₀."""

    def __init__(self, width: int, device: torch.device, bias: bool = True):
        self.bias = bias
        width += int(bias)
        self.gram, self.cross, self.drift = (torch.zeros(width, width, dtype=torch.float64, device=device) for _ in range(3))

    def add(self, x: torch.Tensor, x_dense: torch.Tensor, real: torch.Tensor | None) -> None:
        """x and x_dense [rows, width], rows in the same order; real: bool [rows] or None. Products in float32, as
        `NormalEquations.add`."""
        if real is not None:
            x, x_dense = x[real], x_dense[real]
        dtype = torch.float64 if x.dtype == torch.float64 else torch.float32
        x = x.to(dtype)
        drift = x_dense.to(dtype) - x
        a, d = (torch.cat([x, x.new_ones(x.shape[0], 1)], dim=1), torch.cat([drift, drift.new_zeros(x.shape[0], 1)], dim=1)) \
            if self.bias else (x, drift)
        self.gram += gram(a).double()
        self.cross += (a.T @ d).double()
        self.drift += gram(d).double()

    def equations(self, theta_dense: torch.Tensor, start: torch.Tensor) -> NormalEquations:
        """The normal equations toward the target x_d θ_d from the fit's start θ₀ (both [width (+ 1), outputs]): the
        residual is Δθ_d + A(θ_d - θ₀)."""
        theta_dense, gap = theta_dense.double(), (theta_dense - start).double()
        eq = NormalEquations(self.gram.shape[0] - int(self.bias), theta_dense.shape[1], self.gram.device, self.bias, start)
        eq.gram = self.gram
        eq.residual_cross = self.cross @ theta_dense + self.gram @ gap
        eq.residual_sq = ((theta_dense * (self.drift @ theta_dense)).sum() + 2 * (theta_dense * (self.cross.T @ gap)).sum()
                          + (gap * (self.gram @ gap)).sum())
        return eq


def ridge_solve(gram: torch.Tensor, rhs: torch.Tensor, start: torch.Tensor, ridge: float) -> torch.Tensor:
    """argmin_θ θᵀGθ - 2θᵀ·rhs + λ|θ - start|² with λ = ridge · mean(diag G). Where λ is 0 (`reconstruct_ridge=0`, or
    inputs that are all zero) a Gram with a feature that never varies on the calibration data, or with more features
    than calibration rows, is singular: the solution is then the one that moves least from `start` (its limit as
    λ -> 0), not an error or a blow-up."""
    if not (torch.isfinite(gram).all() and torch.isfinite(rhs).all()):
        raise ValueError("The refit's calibration activations are not finite (inf or NaN: an overflow, as float16 weights "
                         "can give), so no least squares can be fit to them: run the model in float32 or bfloat16, or set "
                         "reconstruct='none'.")
    lam = ridge * gram.diagonal().mean()
    if lam > 0:
        eye = torch.eye(gram.shape[0], dtype=gram.dtype, device=gram.device)
        return torch.linalg.solve(gram + lam * eye, rhs + lam * start)
    return start + torch.linalg.pinv(gram, hermitian=True) @ (rhs - gram @ start)


def solve_weights(eq: NormalEquations, theta0: torch.Tensor, ridge: float) -> torch.Tensor:
    """The ridge fit toward `theta0`, solved for its change from `theta0` (on Aᵀ(Y - Aθ₀)): where θ₀ leaves nothing
    to repair the change is exactly zero, not θ₀'s rounding through the solve."""
    residual = eq.residual_cross + eq.gram @ (eq.start - theta0)
    return theta0 + ridge_solve(eq.gram, residual, torch.zeros_like(theta0), ridge)


def solve_scales(eq: NormalEquations, weight: torch.Tensor, bias: torch.Tensor | None, unit: int, ridge: float) -> torch.Tensor:
    """One factor per unit of `unit` input columns, the bias (if any) fixed: [units].

    Unit u contributes z_u = W[:, u] x_u, so Σ<z_u, z_v> is the block sum of (WᵀW) ⊙ (xᵀx) and
    Σ<z_u, Y - b> that of Σ_o W[o, j] (xᵀY - (Σx) bᵀ)[j, o]; the ridge pulls toward 1.
    """
    width = weight.shape[1]
    w = weight.double()
    xx = eq.gram[:width, :width]
    residual = eq.cross[:width]
    if bias is not None:
        residual = residual - eq.gram[:width, width][:, None] * bias.double()[None, :]
    units = torch.arange(width, device=w.device) // unit
    pick = nn.functional.one_hot(units).to(w.dtype)  # [width, units]
    gram = pick.T @ ((w.T @ w) * xx) @ pick
    rhs = pick.T @ (w * residual.T).sum(0)
    return ridge_solve(gram, rhs, torch.ones_like(rhs), ridge)


def stacked_theta(weight: torch.Tensor, bias: torch.Tensor | None, branch: torch.Tensor | None) -> torch.Tensor:
    """θ [in (+ 1), out] of A θ for a weight [out, in] and its bias, times the branch factor where there is one."""
    theta = weight.T.double() if bias is None else torch.cat([weight.T, bias[None]]).double()
    return theta if branch is None else theta * branch.double()[None, :]


def write_solved(target, theta: torch.Tensor, key: str, tensors: dict[str, torch.Tensor]) -> None:
    """Write a solved θ [in (+ 1), out] into `target` (an output projection, or anything with its `in_features`,
    `weight()` [out, in], `bias()` and `set()`), in the target's dtype, and record the written weight (and bias, where
    the target has one) under `key` in the refit's artifact `tensors`."""
    weight, bias = target.weight(), target.bias()
    weight = theta[: target.in_features].T.to(weight.dtype).contiguous()
    bias = theta[-1].to(bias.dtype) if bias is not None else None
    target.set(weight, bias)
    record(tensors, key, weight, bias)


def record(tensors: dict[str, torch.Tensor], key: str, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """Record a weight [out, in] (and its bias, where there is one) under `key` in an artifact `tensors`: copies on
    the CPU, the weight contiguous (a Conv1D's [out, in] is a transposed view, which safetensors does not save)."""
    tensors[f"{key}.weight"] = weight.detach().cpu().clone(memory_format=torch.contiguous_format)
    if bias is not None:
        tensors[f"{key}.bias"] = bias.detach().cpu().clone()


def patches(conv: nn.Conv2d, x: torch.Tensor, positions: int) -> torch.Tensor:
    """The rows [batch * positions, in * kernel area] of `conv`'s input patches, one per output position, in the
    order of its output map's rows (`map_rows`); a conv with no input channel has rows of no column."""
    if not conv.in_channels:
        return x.new_zeros(x.shape[0] * positions, 0)
    cols = nn.functional.unfold(x, conv.kernel_size, conv.dilation, conv.padding, conv.stride)  # [B, in * k, L]
    return cols.transpose(1, 2).reshape(-1, cols.shape[1])


def map_rows(y: torch.Tensor) -> torch.Tensor:
    """A map [batch, channels, height, width] as rows [batch * positions, channels]."""
    return y.permute(0, 2, 3, 1).reshape(y.shape[0] * y.shape[2] * y.shape[3], y.shape[1])
