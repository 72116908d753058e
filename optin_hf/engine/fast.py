"""The fast engine: the same masked runs as the reference, without the repeated work.

- Prefix caching: a structure of layer i cannot change layers before i, so a run starts at
  layer i from the dense run's cached inputs. A head run starts from the cached heads'
  output (the input of the attention output projection), a neuron run from the FFN input,
  so the attention of layer i is not recomputed either.
- Linear down projection: a neuron run computes its layer's FFN once, densely, and each
  variant subtracts its removed neurons' share of the down projection's output, so the FFN of
  the neuron's layer is not rerun per variant either.
- Batched variants: several candidates of one layer ride in one forward, stacked along the
  batch dimension, each with its own mask.
- No padding: text examples are packed end to end in rows with a block-diagonal attention
  mask (`packing`), or, where a model's layer calls cannot be packed, re-batched by length
  (`buckets`). The MD rows and the examples' logits are the same at their new places, so the
  losses do not change.
- The dense FFN of a neuron's layer is computed once per layer and kept for all its stacks.
"""

from __future__ import annotations

from contextlib import contextmanager, nullcontext
from typing import Iterator

import torch
from torch import nn
from torch.nn import functional as F

from ..arch import ArchAdapter, get_submodule
from ..capture import capture_dense
from ..hooks import scale_input
from ..losses import KLOutputs, kl_loss, later_layers, md_loss, select_examples
from .buckets import bucket_by_length
from .memory import auto_variants, bytes_per_variant
from .packing import pack_calls
from .prefix import LayerCall, record_layer_calls

# Largest relative error the adapter's layer pieces may show against the dense run.
REPLAY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 1e-2}


def _first(output):
    return output[0] if isinstance(output, tuple) else output


def _down_in_out(adapter: ArchAdapter, layer: nn.Module, ffn_input: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The FFN down projection's input [batch, tokens, width] and output [batch, tokens, hidden], unmasked."""
    seen: list[tuple[torch.Tensor, torch.Tensor]] = []
    down = get_submodule(layer, adapter.ffn_down)
    handle = down.register_forward_hook(lambda module, args, output: seen.append((args[0], output)))
    try:
        adapter.feed_forward(layer, ffn_input)
    finally:
        handle.remove()
    [(inputs, outputs)] = seen
    return inputs, outputs


def _masked_down(
    inputs: torch.Tensor, output: torch.Tensor, weight: torch.Tensor, unit_mask: torch.Tensor
) -> torch.Tensor:
    """[variants * batch, tokens, hidden] (variant-major): the down projection's output with its
    input scaled by each row of unit_mask ([variants, width]), from the dense `inputs` and `output`.

    The projection is linear, so a variant only subtracts its changed units' share: tokens x
    changed units x hidden per variant instead of the whole FFN.
    """
    changed = unit_mask != 1
    count = int(changed.sum(1).max())
    # Each variant's changed units come first; one that changes fewer pads with unchanged units, weighted 0.
    picked = changed.to(torch.uint8).argsort(dim=1, descending=True)[:, :count]  # [variants, count]
    share = (1 - unit_mask).gather(1, picked).to(inputs.dtype)
    flat = inputs.reshape(-1, inputs.shape[-1])
    removed = (flat[:, picked] * share).transpose(0, 1)  # [variants, batch * tokens, count]
    delta = torch.bmm(removed, weight.T[picked])  # [variants, batch * tokens, hidden]
    return (output.reshape(1, -1, output.shape[-1]) - delta).reshape(-1, *output.shape[1:])


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
            batches, config.batch_size, config.md_tokens, config.seed, adapter.default_seq_len(model.config)
        )
        with record_layer_calls(model, adapter) as calls:
            capture = capture_dense(model, adapter, buckets.batches, config.md_tokens, config.seed, buckets.rows)
        texts = all("attention_mask" in batch for batch in buckets.batches)
        packing = None
        if texts:
            masks = [batch["attention_mask"] for batch in buckets.batches]
            packing = pack_calls(calls, masks, buckets.rows, config.batch_size)
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
        batch, tokens = max((calls[0].hidden.shape[:2] for calls in self.calls), key=lambda shape: shape[0] * shape[1])
        config = self.model.config
        per_variant = bytes_per_variant(
            batch,
            tokens,
            config.hidden_size,
            self.adapter.intermediate_size(config),
            self.adapter.num_heads(config),
            len(self.layers),
            md_tokens,
        )
        return auto_variants(self.device, per_variant, batch * tokens)

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
        for i, layer in enumerate(self.layers):
            want = calls[i + 1].hidden if i + 1 < len(self.layers) else calls[i].output
            finished = self.adapter.finish_attention(layer, calls[i].heads, calls[i].hidden)
            check(self.adapter.feed_forward(layer, finished), want, f"layer {i} in pieces")
            if self.adapter.finish_feed_forward is not None:
                _, down = _down_in_out(self.adapter, layer, finished)
                finished_down = self.adapter.finish_feed_forward(layer, down, finished)
                check(finished_down, want, f"layer {i} from its down projection's output")
            check(_first(layer(calls[i].hidden, *calls[i].args, **calls[i].kwargs)), want, f"layer {i} replayed")
        if self.outputs[0] is not None:
            got = KLOutputs.of(self._classify(calls[-1].output, 0, 1)).logits
            check(got.flatten(1), self.outputs[0].logits.flatten(1), "classifier")  # per example, not per token

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
            ffn_input = self.adapter.finish_attention(module, call.heads, call.hidden)
            self._down = (layer, forward, ffn_input, *_down_in_out(self.adapter, module, ffn_input))
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

    def _rows(self, feature: torch.Tensor, forward: int, variants: int) -> torch.Tensor:
        """[variants, k, hidden]: the normalised MD rows of a stacked feature of forward `forward`."""
        rows = feature.reshape(variants, -1, feature.shape[-1]).index_select(1, self.rows[forward])
        return F.normalize(rows.float(), dim=-1)

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
        if shortcut:  # the dense FFN once, before any hook sees the stacked variants
            ffn_input, inputs, output = self._cached_down(layer, forward)
            down = _masked_down(inputs, output, get_submodule(module, self.adapter.ffn_down).weight, unit_mask)
            masking = nullcontext()
        else:
            if kind == "head":
                target, width = self.adapter.attn_out, self.adapter.head_dim(self.model.config)
            else:
                target, width = self.adapter.ffn_down, 1
            masking = scale_input(get_submodule(module, target), unit_mask.repeat_interleave(batch, 0), width)
        with masking, self._record_rows(judged, forward, variants) as rows:
            if shortcut:
                hidden = self.adapter.finish_feed_forward(module, down, tile(ffn_input))
                if layer in judged and self.adapter.feature == self.adapter.ffn_down:  # its hook did not run
                    rows[layer] = self._rows(down, forward, variants)
            elif kind == "head":
                hidden = self.adapter.feed_forward(
                    module, self.adapter.finish_attention(module, tile(call.heads), tile(call.hidden))
                )
            else:  # the attention of the layer is unchanged: finish it once, then tile
                hidden = self.adapter.feed_forward(
                    module, tile(self.adapter.finish_attention(module, call.heads, call.hidden))
                )
            for z in range(layer + 1, len(self.layers)):
                args, kwargs = tile.call(calls[z])
                hidden = _first(self.layers[z](hidden, *args, **kwargs))
            logits = self._classify(hidden, forward, variants)
        return rows, logits

    @torch.no_grad()
    def run(self, kind: str, layer: int, unit_mask: torch.Tensor) -> list[tuple[float, float]]:
        """(MD, KL) of each candidate of `layer` (unit_mask: [variants, units]), all in stacked forwards."""
        variants = unit_mask.shape[0]
        unit_mask = unit_mask.to(self.device)
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
