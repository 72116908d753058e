"""The projection contract (optin_hf/arch/projection.py): a unit's parameters read and cut the same way
whatever the module's layout: a fused q|k|v weight, GPT-2's transposed Conv1D, grouped KV heads, a gated
FFN, projections without a bias; and the refit through it."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from optin_hf.arch import Projection, Slice
from optin_hf.arch.projection import owned_norms, select_features, slice_features
from optin_hf.least_squares import NormalEquations
from optin_hf.reconstruct import _refit


def conv1d_of(linear: nn.Linear) -> Conv1D:
    """The Conv1D that computes what `linear` computes (weight stored [in, out])."""
    conv = Conv1D(linear.out_features, linear.in_features)
    conv.weight = nn.Parameter(linear.weight.detach().T.clone())
    conv.bias = nn.Parameter(linear.bias.detach().clone())
    return conv


def test_a_fused_qkv_conv1d_slices_as_three_separate_projections():
    """GPT-2's c_attn ([in, 3d] Conv1D): a head owns its dh columns in each of the q, k and v blocks."""
    torch.manual_seed(0)
    hidden, heads, dh = 12, 4, 3
    q, k, v = (nn.Linear(hidden, heads * dh) for _ in range(3))
    fused = nn.Linear(hidden, 3 * heads * dh)
    with torch.no_grad():
        fused.weight.copy_(torch.cat([q.weight, k.weight, v.weight]))
        fused.bias.copy_(torch.cat([q.bias, k.bias, v.bias]))
    c_attn = conv1d_of(fused)
    keep = torch.tensor([0, 2, 3])
    part = Slice("c_attn", "out", segments=3)
    small = select_features(c_attn, slice_features(c_attn, part, keep, dh), "out")
    x = torch.randn(5, hidden)
    separate = [select_features(p, slice_features(p, Slice("p", "out"), keep, dh), "out")(x) for p in (q, k, v)]
    assert isinstance(small, Conv1D) and small.weight.shape == (hidden, 3 * len(keep) * dh)
    torch.testing.assert_close(small(x), torch.cat(separate, dim=-1))
    # the magnitude of a head: the same in the fused and the separate layout
    fused_norms = owned_norms(c_attn, part, heads, dh)
    separate_norms = sum(owned_norms(p, Slice("p", "out"), heads, dh) for p in (q, k, v))
    torch.testing.assert_close(fused_norms, separate_norms)


def test_grouped_kv_heads_and_a_gated_ffn_slice_as_units_of_several_widths():
    """A KV group owns g query heads' rows (width g*dh) and one key and value head (width dh); a gated FFN
    unit its gate row, its up row and its down column. Slimming one unit set equals masking it."""
    torch.manual_seed(1)
    hidden, groups, g, dh, width = 16, 3, 2, 4, 10
    q, k, o = nn.Linear(hidden, groups * g * dh, bias=False), nn.Linear(hidden, groups * dh, bias=False), nn.Linear(groups * g * dh, hidden, bias=False)
    keep = torch.tensor([1, 2])
    slim_q = select_features(q, slice_features(q, Slice("q", "out", width=g * dh), keep, 0), "out")
    slim_k = select_features(k, slice_features(k, Slice("k", "out", width=dh), keep, 0), "out")
    slim_o = select_features(o, slice_features(o, Slice("o", "in", width=g * dh), keep, 0), "in")
    assert slim_q.weight.shape == (len(keep) * g * dh, hidden) and slim_k.weight.shape == (len(keep) * dh, hidden)
    assert slim_q.bias is None and slim_o.bias is None
    torch.testing.assert_close(slim_q.weight, q.weight.view(groups, g * dh, hidden)[keep].reshape(-1, hidden))
    torch.testing.assert_close(slim_k.weight, k.weight.view(groups, dh, hidden)[keep].reshape(-1, hidden))
    # a gated FFN: silu(gate x) * up x -> down
    gate, up, down = nn.Linear(hidden, width, bias=False), nn.Linear(hidden, width, bias=False), nn.Linear(width, hidden, bias=False)
    units = torch.tensor([0, 3, 4, 9])
    parts = {"gate": Slice("gate", "out"), "up": Slice("up", "out"), "down": Slice("down", "in")}
    slim = {name: select_features(m, slice_features(m, parts[name], units, 1), parts[name].side)
            for name, m in (("gate", gate), ("up", up), ("down", down))}
    x = torch.randn(7, hidden)
    mask = torch.zeros(width)
    mask[units] = 1
    masked = down(nn.functional.silu(gate(x)) * up(x) * mask)
    torch.testing.assert_close(slim["down"](nn.functional.silu(slim["gate"](x)) * slim["up"](x)), masked)


def test_projection_reads_every_layout_as_out_by_in():
    torch.manual_seed(2)
    linear = nn.Linear(6, 4)
    conv1d = conv1d_of(linear)
    conv = nn.Conv2d(6, 4, 1)
    with torch.no_grad():
        conv.weight.copy_(linear.weight[:, :, None, None])
        conv.bias.copy_(linear.bias)
    x = torch.randn(2, 3, 6)
    for module in (linear, conv1d, conv):
        proj = Projection(module)
        assert proj.weight().shape == (4, 6) and (proj.in_features, proj.out_features) == (6, 4)
        torch.testing.assert_close(proj.weight(), linear.weight.detach())
    # rows: a conv's channels are dimension 1; unrows puts them back
    image = torch.randn(2, 6, 3, 5)
    rows = Projection(conv).rows(image)
    torch.testing.assert_close(rows @ linear.weight.T + linear.bias, Projection(conv).rows(conv(image)))
    torch.testing.assert_close(Projection(conv).unrows(Projection(conv).rows(conv(image)), (2, 4, 3, 5)), conv(image))
    # set() writes an [out, in] matrix back in the module's own layout
    new = torch.randn(4, 6)
    for module in (copy.deepcopy(linear), copy.deepcopy(conv1d), copy.deepcopy(conv)):
        Projection(module).set(new, None)
        torch.testing.assert_close(Projection(module).weight(), new)
    torch.testing.assert_close(conv1d(x), linear(x))
    with pytest.raises(TypeError, match="pointwise"):
        Projection(nn.Conv2d(6, 4, 3))


@pytest.mark.parametrize(("layout", "bias"), [("linear", True), ("linear", False), ("conv1d", True)])  # Conv1D always has one
def test_the_refit_solves_the_same_problem_in_every_layout_with_or_without_bias(bias: bool, layout: str):
    """A projection without a bias stays without one (no constant column), and a Conv1D's refit is the Linear's."""
    torch.manual_seed(3)
    linear = nn.Linear(8, 5, bias=bias)
    module = linear if layout == "linear" else Conv1D(5, 8)
    if layout == "conv1d":
        module.weight = nn.Parameter(linear.weight.detach().T.clone())
        module.bias = nn.Parameter(linear.bias.detach().clone())
    x = torch.randn(200, 8)
    target = x @ torch.randn(8, 5) + (torch.randn(5) if bias else 0)
    proj = Projection(module)
    eq = NormalEquations(proj.in_features, proj.out_features, proj.device, proj.has_bias)
    eq.add(x, target, None)
    before, after = _refit(proj, eq, "weights", 1e-6, 1, "layers.0.ffn_down", tensors := {})
    assert after < before * 1e-3
    assert ("layers.0.ffn_down.bias" in tensors) == bias and (module.bias is not None) == bias
    assert tensors["layers.0.ffn_down.weight"].shape == (5, 8)  # [out, in] whatever the layout
    torch.testing.assert_close(module(x), target, atol=1e-3, rtol=1e-3)
