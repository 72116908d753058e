"""Token merging for vision models, as OPTIN's tau mode runs it.

OPTIN decides how many tokens each layer holds (the token schedule); which tokens merge is
decided at run time, per image, by bipartite soft matching (Token Merging, ToMe, Bolya et al.
2023): before a layer, the patch tokens are split alternately into sets A and B, each A token
finds its most similar B token (cosine similarity of the hidden states), and the r most
similar pairs are merged by size-weighted averaging. Sizes (how many patches a token stands
for) are tracked across layers. The class (and DeiT's distillation) tokens never merge.

Attention is proportional, as in ToMe: log(size) is added to the attention logits (passed
to the layer as an additive attention mask, which eager and sdpa attention honour), so a
merged token draws the attention of the patches it stands for. On the digits ViT it lifts
accuracy at every budget tried (benchmarks/RESULTS.md).
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import partial
from typing import Sequence

import torch
from torch import nn
from torch.nn import functional as F

from .arch import ArchAdapter


def merge_rounds(num_patches: int, target_patches: int) -> list[tuple[int, int, int]]:
    """(|A|, |B|, merges) of each matching round taking `num_patches` down to `target_patches`.

    One round can merge at most |A| = ceil(n / 2) tokens, so deep cuts take several rounds.
    """
    if target_patches < 1 or target_patches > num_patches:
        raise ValueError(f"Cannot merge {num_patches} patch tokens down to {target_patches}: need 1 <= target <= {num_patches}.")
    rounds = []
    while num_patches > target_patches:
        size_a, size_b = (num_patches + 1) // 2, num_patches // 2
        merges = min(num_patches - target_patches, size_a)
        rounds.append((size_a, size_b, merges))
        num_patches -= merges
    return rounds


@dataclass(frozen=True)
class Match:
    """One round's pairing: src [batch, merges] A tokens merge into dst [batch, merges] B tokens;
    kept [batch, |A| - merges] A tokens stay (in their original order)."""

    src: torch.Tensor
    dst: torch.Tensor
    kept: torch.Tensor


def match_tokens(x: torch.Tensor, merges: int) -> Match:
    """Bipartite soft matching on patch tokens x: [batch, n, dim]: A (even) tokens pair with their
    most similar B (odd) token by cosine similarity; the `merges` most similar pairs merge."""
    metric = F.normalize(x, dim=-1)
    similarity = metric[:, ::2] @ metric[:, 1::2].transpose(1, 2)  # [batch, |A|, |B|]
    best, match = similarity.max(dim=-1)
    order = best.argsort(dim=-1, descending=True)
    src = order[:, :merges]
    return Match(src, match.gather(1, src), order[:, merges:].sort(dim=-1).values)


def merge_matched(x: torch.Tensor, sizes: torch.Tensor, match: Match) -> tuple[torch.Tensor, torch.Tensor]:
    """Apply one round's `match` to x: [batch, n, dim] with sizes: [batch, n, 1].

    Returns [batch, n - merges, dim] and its sizes: the unmerged A tokens, then the B tokens,
    each the size-weighted mean of itself and the A tokens merged in.
    """
    src, dst, kept = match.src, match.dst, match.kept
    dim = x.shape[-1]
    x_a, x_b = x[:, ::2], x[:, 1::2]
    s_a, s_b = sizes[:, ::2], sizes[:, 1::2]
    take = lambda t, i: t.gather(1, i[..., None].expand(-1, -1, t.shape[-1]))  # noqa: E731
    weighted = (x_b * s_b).scatter_add(1, dst[..., None].expand(-1, -1, dim), take(x_a * s_a, src))
    s_b = s_b.scatter_add(1, dst[..., None], take(s_a, src))
    return torch.cat([take(x_a, kept), weighted / s_b], dim=1), torch.cat([take(s_a, kept), s_b], dim=1)


class TokenMerging(nn.Module):
    """Runs a token schedule on a vision encoder: a forward pre-hook on each layer merges its
    input down to `schedule[i]` tokens (prefix tokens included).

    It holds no weights, so checkpoints are unchanged; `slim_model` installs it from the masks'
    `token_schedule`, so `AutoOptinModel.from_pretrained` rebuilds it with no extra step. The
    patch sizes of the forward in progress live in `sizes` between layers (reset at layer 0), so
    a model runs one forward at a time (no concurrent threads on one instance). `matches` holds
    the rounds of the last merge, so another stream (the dense model in `reconstruct`) can merge
    the same tokens.
    """

    def __init__(self, schedule: Sequence[int], num_prefix_tokens: int):
        super().__init__()
        self.schedule = [int(n) for n in schedule]
        self.num_prefix_tokens = num_prefix_tokens
        self.sizes: torch.Tensor | None = None
        self.matches: list[Match] = []

    def extra_repr(self) -> str:
        return f"schedule={self.schedule}, num_prefix_tokens={self.num_prefix_tokens}"

    def before_layer(self, index: int, module: nn.Module, args: tuple) -> tuple | None:
        """Forward pre-hook of layer `index`: (hidden_states, attention_mask) -> merged ones."""
        x, prefix = args[0], self.num_prefix_tokens
        if index == 0:
            self.sizes = x.new_ones(x.shape[0], x.shape[1] - prefix, 1)
        self.matches = []
        if x.shape[1] == self.schedule[index] == self.schedule[0]:
            return None  # nothing merged yet: plain attention
        if len(args) > 1 and args[1] is not None:
            raise ValueError("Token merging cannot run with an attention mask: the merged tokens would not match it.")
        head, patches, sizes = x[:, :prefix], x[:, prefix:], self.sizes
        for _, _, merges in merge_rounds(patches.shape[1], self.schedule[index] - prefix):
            self.matches.append(match_tokens(patches, merges))
            patches, sizes = merge_matched(patches, sizes, self.matches[-1])
        self.sizes = sizes
        return (torch.cat([head, patches], dim=1), proportional_attention(sizes, prefix), *args[2:])


def proportional_attention(sizes: torch.Tensor, num_prefix_tokens: int) -> torch.Tensor:
    """The additive attention mask [batch, 1, 1, tokens] of ToMe's proportional attention:
    log(size) for each patch token, 0 for the prefix tokens."""
    log_sizes = torch.cat([sizes.new_zeros(sizes.shape[0], num_prefix_tokens), sizes[..., 0].log()], dim=1)
    return log_sizes[:, None, None, :]


def install_token_merging(model: nn.Module, adapter: ArchAdapter, schedule: Sequence[int]) -> TokenMerging:
    """Attach a `TokenMerging` (as `model.base_model.token_merging`) with a pre-hook on every layer."""
    if not adapter.is_vision:
        raise ValueError(f"Token schedules are for vision models (vit, deit), not {model.config.model_type!r}.")
    layers = adapter.layers_of(model)
    if len(schedule) != len(layers):
        raise ValueError(f"The token schedule has {len(schedule)} entries but the model has {len(layers)} layers.")
    merging = TokenMerging(schedule, adapter.num_prefix_tokens)
    model.base_model.token_merging = merging
    for index, layer in enumerate(layers):
        layer.register_forward_pre_hook(partial(merging.before_layer, index))
    return merging


def installed_schedule(model: nn.Module) -> list[int] | None:
    """The token schedule a model runs, or None when it merges no tokens."""
    merging = getattr(model.base_model, "token_merging", None)
    return list(merging.schedule) if merging is not None else None
