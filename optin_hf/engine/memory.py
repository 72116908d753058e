"""How many mask variants to stack in one forward: as many as fit the free memory, up to the
point where bigger forwards stop running faster.
"""

from __future__ import annotations

import psutil
import torch

# Memory share a scoring run may take: the rest is left to the caller (and, on CPU, the system).
MEMORY_SHARE = {"cuda": 0.6, "cpu": 0.25}
# Tokens per forward past which throughput no longer grows. On CPU a matmul runs as fast per row
# at a few hundred rows as at thousands, so stacking only saves per-forward overhead, while the
# elementwise work (GELU, copies) slows down once a forward's activations leave the cache.
# MiniLM on 32 packed tweets (1,110 rows a variant, 1 thread), best of 6, per candidate: 300/254 ms
# (a head/a neuron of layer 1) with 1 variant a forward, 291/250 with 2, 325/283 with 5; stacks of
# 32-64 bucketed variants ran 10-40% slower than stacks of 2-12. A GPU needs hundreds of thousands
# of tokens to fill.
SATURATING_TOKENS = {"cuda": 1 << 19, "cpu": 1 << 11}


def free_memory(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    return psutil.virtual_memory().available


def bytes_per_variant(
    batch: int, tokens: int, hidden: int, intermediate: int, heads: int, num_layers: int, md_tokens: int
) -> int:
    """Peak memory one variant of a [batch, tokens] bucket adds to a forward.

    Live activations of one layer (hidden-sized tensors, the FFN intermediate, attention scores
    and probabilities), its copy of the extended attention mask, and the MD rows it keeps for
    every judged layer until the candidate's loss is computed. Counted at 4 bytes an element
    even under half-precision autocast, which keeps LayerNorm and softmax outputs in float32.
    """
    n = batch * tokens
    activations = n * (8 * hidden + 2 * intermediate) * 4 + 2 * batch * heads * tokens * tokens * 4
    mask = batch * tokens * tokens * 4
    rows = md_tokens * hidden * 4 * num_layers
    return activations + mask + rows


def auto_variants(device: torch.device, per_variant: int, tokens_per_variant: int) -> int:
    """Variants per forward that fit the device's memory share and do not pass saturation."""
    kind = "cuda" if device.type == "cuda" else "cpu"
    by_memory = int(free_memory(device) * MEMORY_SHARE[kind]) // max(per_variant, 1)
    by_speed = SATURATING_TOKENS[kind] // max(tokens_per_variant, 1)
    return max(1, min(by_memory, by_speed))
