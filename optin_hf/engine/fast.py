"""The fast engine: the same masked runs as the reference, without the repeated work.

- Prefix caching: a structure of layer i cannot change layers before i, so a run starts at
  layer i from the dense run's cached inputs. A head run starts from the cached heads'
  output (the input of the attention output projection), a neuron run from the FFN input,
  so the attention of layer i is not recomputed either.
- Linear down projection: a neuron run computes its layer's FFN once, densely, and each
  variant subtracts its removed neurons' share of the down projection's output, so the FFN of
  the neuron's layer is not rerun per variant either.
- Batched variants: several candidates of one layer ride in one forward, stacked along the
  batch dimension, each with its own mask: as many as fit the free memory, up to the point where
  bigger forwards stop running faster (`auto_variants`).
- No padding: text examples are packed end to end in rows with a block-diagonal attention
  mask (`prefix.pack_calls`), or, where a model's layer calls cannot be packed, re-batched by
  length (`prefix.bucket_by_length`). The MD rows and the examples' logits are the same at their new places, so the
  losses do not change.
- The dense FFN of a neuron's layer is computed once per layer and kept for all its stacks.
- Layers that do not form a chain (`ArchAdapter.chained_layers` False: Swin, SegFormer,
  Mask2Former) finish a run with the model's own forward, the layers up to the masked one
  replayed from their outputs (`replay`), instead of running the later layers and a classifier
  piece.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import psutil
import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchAdapter, Projection, get_submodule
from ..capture import capture_dense, layer_rows, scoring_forward
from ..data import image_size_of
from ..hooks import scale_input
from ..losses import KLOutputs, comparable, kl_loss, later_layers, md_loss, select_examples
from .prefix import LayerCall, bucket_by_length, pack_calls, record_layer_calls
from .replay import layer_output, replay_layers
from .streaming import resident

# Largest relative error the adapter's layer pieces may show against the dense run.
REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}

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
    """Bytes free on `device` (on CPU, the system's available memory)."""
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


def stacked_variants(adapter: ArchAdapter, config, examples: int, tokens: int, md_tokens: int, device: torch.device) -> int:
    """The candidates the fast engine stacks in one forward over `examples` of `tokens` each (`FastRunner.variants`
    when `variants_per_batch` is unset): what fits `device` (`auto_variants`); the estimate sizes its stacks alike."""
    geometry = adapter.layer_geometry(config)
    per_variant = bytes_per_variant(examples, tokens, max(g.hidden for g in geometry),  # a staged model's config may name none
                                    adapter.intermediate_size(config), adapter.num_heads(config), len(geometry), md_tokens)
    return auto_variants(device, per_variant, examples * tokens)


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _feature(output) -> torch.Tensor:
    """A feature module's output as [batch, tokens, features] (`hooks.record_features` reads it so): a whole
    layer's tuple gives its first element, a CNN's map [batch, channels, height, width] its positions."""
    feature = _first(output)
    return feature.flatten(2).transpose(1, 2) if feature.dim() == 4 else feature


def _down_in_out(adapter: ArchAdapter, layer: nn.Module, ffn_input: torch.Tensor, call: LayerCall) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN down projection's input [batch, tokens, width] and output [batch, tokens, hidden], unmasked:
    its output where `Projection.output_module` gives it (after the BatchNorm a projection includes)."""
    inputs: list[torch.Tensor] = []
    outputs: list[torch.Tensor] = []
    down = adapter.projection(layer, "ffn_down")
    handles = [down.module.register_forward_pre_hook(lambda module, args: inputs.append(args[0])),
               # a copy: the layer may add its residual to it in place (ResNet)
               down.output_module.register_forward_hook(lambda module, args, output: outputs.append(output.clone()))]
    try:
        adapter.feed_forward(layer, ffn_input, *call.args, **call.kwargs)
    finally:
        for handle in handles:
            handle.remove()
    [x], [y] = inputs, outputs
    return x, y


def _masked_down(inputs: torch.Tensor, output: torch.Tensor, down: Projection, unit_mask: torch.Tensor) -> torch.Tensor:
    """[variants * batch, ...] (variant-major, the layout of `output`): the down projection's output
    with its input scaled by each row of unit_mask ([variants, width]), from the dense `inputs` and
    `output`, read through the projection contract (any weight orientation, features last or a
    conv's channels).

    The projection is linear, so a variant only subtracts its changed units' share: tokens x
    changed units x hidden per variant instead of the whole FFN.
    """
    changed = unit_mask != 1
    count = int(changed.sum(1).max())
    # Each variant's changed units come first; one that changes fewer pads with unchanged units, weighted 0.
    picked = changed.to(torch.uint8).argsort(dim=1, descending=True)[:, :count]  # [variants, count]
    share = (1 - unit_mask).gather(1, picked).to(inputs.dtype)
    flat = down.rows(inputs)
    removed = (flat[:, picked] * share).transpose(0, 1)  # [variants, positions, count]
    delta = torch.bmm(removed, down.weight().T[picked])  # [variants, positions, hidden]
    rows = (down.rows(output)[None] - delta).reshape(-1, delta.shape[-1])
    return down.unrows(rows, (unit_mask.shape[0] * output.shape[0], *output.shape[1:]))


class _Tiler:
    """Repeats batch-shaped tensors once per variant (variant-major), each tensor once per forward."""

    def __init__(self, batch: int, variants: int):
        self.batch, self.variants = batch, variants
        self.tiled: dict[int, torch.Tensor] = {}

    def __call__(self, x):
        if not torch.is_tensor(x) or x.dim() == 0 or x.shape[0] != self.batch or self.variants == 1:
            return x
        if id(x) not in self.tiled:  # every layer gets the same attention mask: tile it once
            self.tiled[id(x)] = x.repeat(self.variants, *([1] * (x.dim() - 1)))
        return self.tiled[id(x)]

    def call(self, call: LayerCall) -> tuple[tuple, dict]:
        return tuple(self(a) for a in call.args), {k: self(v) for k, v in call.kwargs.items()}


class FastRunner:
    """Runs the candidates of one layer in stacks of `variants` from the dense run's cache."""

    def __init__(self, model: nn.Module, adapter: ArchAdapter, batches: list[dict[str, torch.Tensor]], config):
        self.model, self.adapter = model, adapter
        self.layers = adapter.layers_of(model)
        self.classifier = adapter.classifier_of(model)
        self.temperature = config.temperature
        self.device = next(model.parameters()).device
        buckets = bucket_by_length(
            batches, config.batch_size, config.md_tokens, config.seed, adapter.default_seq_len(model.config, image_size_of(batches))
        )
        with record_layer_calls(model, adapter) as calls:
            capture = capture_dense(model, adapter, buckets.batches, config.md_tokens, config.seed, buckets.rows)
        packable = adapter.packs_examples and all("attention_mask" in batch for batch in buckets.batches)
        packing = None
        if packable:
            masks = [batch["attention_mask"] for batch in buckets.batches]
            packing = pack_calls(calls, masks, buckets.rows, config.batch_size)
        self.tokens = capture.tokens  # per example, what the MD rows index (`capture.layer_rows`)
        self.batches = buckets.batches  # the model's own forward runs them where the layers do not chain
        if packing is None:  # forwards = the buckets, in the dense run's order
            self.calls, self.grams, self.outputs = calls, capture.grams, capture.outputs
            self.rows = [r.to(self.device) for r in buckets.rows]
            self.first: list[torch.Tensor | None] = [None] * len(calls)
            self.real: torch.Tensor | None = None  # the first forward's positions that hold tokens; None: all
        else:  # forwards = the packs; the dense reference is reordered as the packs list their tokens
            order = packing.md_order.to(self.device)
            self.calls = [pack.calls for pack in packing.packs]
            self.grams = [gram[order][:, order] for gram in capture.grams]
            if capture.outputs[0] is None:  # a bare encoder
                self.outputs = [None] * len(packing.packs)
            else:  # each pack's examples, taken from their buckets
                sizes = [len(pack.first) for pack in packing.packs]
                self.outputs = select_examples(capture.outputs, sizes, packing.example_order)
            self.rows = [pack.rows.to(self.device) for pack in packing.packs]
            self.first = [pack.first.to(self.device) for pack in packing.packs]
            self.real = packing.packs[0].real.to(self.device)
        self._down: tuple[int, int, torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self._check_replay(REPLAY_TOLERANCE[getattr(torch, config.dtype)])
        self.variants = config.variants_per_batch or self._auto_variants(config.md_tokens)

    def _auto_variants(self, md_tokens: int) -> int:
        # tokens per example: a CNN's [batch, channels, height, width] map holds height * width
        shapes = [(c[0].hidden.shape[0], c[0].hidden.shape[1] if c[0].hidden.dim() == 3 else c[0].hidden[0, 0].numel())
                  for c in self.calls]
        batch, tokens = max(shapes, key=lambda shape: shape[0] * shape[1])
        return stacked_variants(self.adapter, self.model.config, batch, tokens, md_tokens, self.device)

    @torch.no_grad()
    def _check_replay(self, tolerance: float) -> None:
        """Refuse a model whose layers or classifier the adapter's pieces do not reproduce."""

        real = self.real

        def check(got: torch.Tensor, want: torch.Tensor, what: str) -> None:
            if real is not None and got.dim() == 3:  # a pack's unused positions hold nothing to compare
                got, want = got.reshape(-1, got.shape[-1])[real], want.reshape(-1, want.shape[-1])[real]
            error = float((got.float() - want.float()).norm() / want.float().norm().clamp_min(1e-12))
            if error > tolerance:
                raise RuntimeError(
                    f"The fast engine does not reproduce {type(self.model).__name__}'s dense run ({what}: relative "
                    f"error {error:.2e}); its adapter does not match this model. Use OptinConfig(engine='reference')."
                )

        calls = self.calls[0]
        chained = self.adapter.chained_layers
        for i, layer in enumerate(self.layers):
            want = calls[i + 1].hidden if chained and i + 1 < len(self.layers) else calls[i].output
            call = calls[i]
            with resident(layer):  # its pieces run outside its forward (`streaming`)
                finished = self.adapter.finish_attention(layer, call.heads, call.hidden, *call.args, **call.kwargs)
                check(self.adapter.feed_forward(layer, finished, *call.args, **call.kwargs), want, f"layer {i} in pieces")
                if self.adapter.finish_feed_forward is not None:
                    _, down = _down_in_out(self.adapter, layer, finished, call)
                    finished_down = self.adapter.finish_feed_forward(layer, down, finished, *call.args, **call.kwargs)
                    check(finished_down, want, f"layer {i} from its down projection's output")
                check(_first(layer(calls[i].hidden, *calls[i].args, **calls[i].kwargs)), want, f"layer {i} replayed")
        if self.outputs[0] is not None:
            last = calls[-1].output
            if chained:
                logits = self._classify(last, 0, 1)
            else:  # the model's own forward from the replayed layers: checks the replay too
                logits = self._finish(len(self.layers) - 1, last, 0, _Tiler(last.shape[0], 1))
            got, want = comparable(self.outputs[0], KLOutputs.of(logits))  # the logits, or the top-k log-probabilities kept
            check(got.flatten(1), want.flatten(1), "classifier")  # per example, not per token

    def _classify(self, hidden: torch.Tensor, forward: int, variants: int) -> torch.Tensor | None:
        """Logits of a stacked forward's examples: a pack's examples start inside its rows, so the
        tokens the task head reads (each example's first `adapter.pooled_tokens`) are moved to rows
        of their own first."""
        first = self.first[forward]
        if first is not None:
            pooled = first[:, None] + torch.arange(self.adapter.pooled_tokens, device=first.device)
            width = hidden.shape[-1]
            hidden = hidden.reshape(variants, -1, width)[:, pooled.flatten()].reshape(-1, pooled.shape[1], width)
        return self.classifier(self.model, hidden)

    def _cached_down(self, layer: int, forward: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(FFN input, down projection input, its output) of one layer in one forward's dense run,
        kept for the next stack of the same layer: a layer's neurons come in many stacks."""
        if self._down is None or self._down[:2] != (layer, forward):
            module, call = self.layers[layer], self.calls[forward][layer]
            ffn_input = self.adapter.finish_attention(module, call.heads, call.hidden, *call.args, **call.kwargs)
            self._down = (layer, forward, ffn_input, *_down_in_out(self.adapter, module, ffn_input, call))
        return self._down[2:]

    @contextmanager
    def _record_rows(self, judged: range, forward: int, variants: int) -> Iterator[dict[int, torch.Tensor]]:
        """rows[z]: [variants, k, hidden], layer z's normalised MD rows of this forward, per variant.

        A judged feature that the run does not recompute (it lies before the mask) is absent.
        """
        rows: dict[int, torch.Tensor] = {}

        def keep(z: int):
            def hook(module, args, output):
                rows[z] = self._rows(output, forward, variants)

            return hook

        handles = [get_submodule(self.layers[z], self.adapter.feature).register_forward_hook(keep(z)) for z in judged]
        try:
            yield rows
        finally:
            for handle in handles:
                handle.remove()

    def _rows(self, feature, forward: int, variants: int) -> torch.Tensor:
        """[variants, k, hidden]: the normalised MD rows of a stacked feature (a feature module's output) of
        forward `forward`, at the feature's own resolution (a later Swin stage holds fewer tokens)."""
        feature = _feature(feature)
        picked = layer_rows(self.rows[forward], self.tokens, feature.shape[1])
        rows = feature.reshape(variants, -1, feature.shape[-1]).index_select(1, picked)
        return F.normalize(rows.float(), dim=-1)

    def _finish(self, layer: int, hidden: torch.Tensor, forward: int, tile: _Tiler) -> torch.Tensor | None:
        """The logits of the model's own forward on forward `forward`'s tiled batch, layer `layer` giving
        `hidden` (tiled) and the layers before it their dense outputs, none of them run (`replay`): what the
        model runs between and after its layers (Swin's patch mergings, a decode head) runs as it does."""
        calls = self.calls[forward]
        outputs = {j: layer_output(tile(calls[j].output), calls[j].tuple_size) for j in range(layer)}
        outputs[layer] = layer_output(hidden, calls[layer].tuple_size)
        with replay_layers(self.layers, outputs):
            output = scoring_forward(self.model, {k: tile(v) for k, v in self.batches[forward].items()})
        return self.adapter.logits_of(output)

    def _forward(
        self, kind: str, layer: int, unit_mask: torch.Tensor, forward: int
    ) -> tuple[dict[int, torch.Tensor], torch.Tensor | None]:
        """The stacked variants of one forward (a bucket or a pack) from inside `layer`; unit_mask: [variants, units]."""
        calls = self.calls[forward]
        call = calls[layer]
        variants, batch = unit_mask.shape[0], call.hidden.shape[0]
        tile = _Tiler(batch, variants)
        module = self.layers[layer]
        judged = later_layers(layer, len(self.layers))
        shortcut = kind == "neuron" and self.adapter.finish_feed_forward is not None
        args, kwargs = tile.call(call)
        if shortcut:  # the dense FFN once, before any hook sees the stacked variants
            with resident(module):  # reads the down projection's weight (`streaming`)
                ffn_input, inputs, output = self._cached_down(layer, forward)
                down = _masked_down(inputs, output, self.adapter.projection(module, "ffn_down"), unit_mask)
            masking = nullcontext()
        else:
            if kind == "head":
                target, width = self.adapter.attn_out, self.adapter.layer_head_dim(module, self.model.config)
            else:
                target, width = self.adapter.ffn_down, 1
            masking = scale_input(get_submodule(module, target), unit_mask.repeat_interleave(batch, 0), width)
        with masking, self._record_rows(judged, forward, variants) as rows:
            with resident(module):  # the masked layer runs in pieces, outside its forward (`streaming`)
                if shortcut:
                    hidden = self.adapter.finish_feed_forward(module, down, tile(ffn_input), *args, **kwargs)
                    if layer in judged and self.adapter.feature == self.adapter.ffn_down:  # its hook did not run
                        rows[layer] = self._rows(down, forward, variants)
                elif kind == "head":  # the heads' input may hold several rows per example (windows): tiled whole
                    heads = call.heads.repeat(variants, *([1] * (call.heads.dim() - 1)))
                    hidden = self.adapter.feed_forward(
                        module, self.adapter.finish_attention(module, heads, tile(call.hidden), *args, **kwargs), *args, **kwargs
                    )
                else:  # the attention of the layer is unchanged: finish it once, then tile
                    finished = self.adapter.finish_attention(module, call.heads, call.hidden, *call.args, **call.kwargs)
                    hidden = self.adapter.feed_forward(module, tile(finished), *args, **kwargs)
            if self.adapter.chained_layers:
                if layer in judged and not self.adapter.feature:  # the feature is the layer's output: the pieces gave it
                    rows[layer] = self._rows(hidden, forward, variants)
                for z in range(layer + 1, len(self.layers)):
                    args, kwargs = tile.call(calls[z])
                    hidden = _first(self.layers[z](hidden, *args, **kwargs))
                logits = self._classify(hidden, forward, variants)
            else:
                logits = self._finish(layer, hidden, forward, tile)
        return rows, logits

    @torch.no_grad()
    def run(self, kind: str, layer: int, unit_mask: torch.Tensor) -> list[tuple[float, float]]:
        """(MD, KL) of each candidate of `layer` (unit_mask: [variants, units]), all in stacked forwards."""
        variants = unit_mask.shape[0]
        g = self.adapter.layer_geometry(self.model.config)[layer]
        unit_mask = unit_mask.to(self.device)[:, : g.heads if kind == "head" else g.neurons]  # a narrower layer's own units
        rows: dict[int, list[torch.Tensor]] = {z: [] for z in later_layers(layer, len(self.layers))}
        logits: list[torch.Tensor | None] = []  # per forward: [variants, examples, classes, *positions]
        for forward in range(len(self.calls)):
            forward_rows, forward_logits = self._forward(kind, layer, unit_mask, forward)
            for z, r in forward_rows.items():
                rows[z].append(r)
            if forward_logits is not None:
                forward_logits = forward_logits.reshape(variants, -1, *forward_logits.shape[1:])
            logits.append(forward_logits)
        results = []
        for v in range(variants):
            # A judged layer with no rows lies before the mask (a ViT's last-layer feature): its MD is 0.
            md = sum(float(md_loss(self.grams[z], torch.cat([r[v] for r in per_forward])))
                     for z, per_forward in rows.items() if per_forward)
            masked = [None if out is None else KLOutputs.of(out[v]) for out in logits]
            results.append((md, float(kl_loss(self.outputs, masked, self.temperature))))
        return results
