"""PTF's Fisher baseline (Kwon et al., NeurIPS 2022): the empirical Fisher information of a mask
variable on each head and FFN neuron.

A mask `m_i = 1` multiplies unit i's output (the hooks of `optin_hf.hooks`), and its score is
`sum over calibration examples of (d loss_example / d m_i)^2`, from per-example gradients: each
example gets its own row of masks ([batch, units]), so one backward of the summed losses yields
every example's gradient in its row. The loss is the one the task head trains with: the
cross-entropy on the example's label (MSE for regression, `num_labels == 1`; the mean binary
cross-entropy of its labels for `problem_type="multi_label_classification"`); for a segmenter
(logits [batch, classes, h, w]: SegFormer's, or Mask2Former's semantic map, `ArchAdapter.logits_of`)
the mean over the image's pixels of the per-pixel cross-entropy against a label map, the logits
upsampled to it as SegFormer's own loss does (pixels of the config's ignore index left out).
Without labels in the calibration data, a classifier is scored against its own predicted class
(the argmax of its dense logits, per pixel for a segmenter); a regressor cannot be (the MSE to
its own prediction has zero gradient), nor can a bare encoder (no logits). The raw values are
comparable across layers and between heads and neurons (all are the same loss's sensitivity to a
multiplier), so the global budget search ranks them together as they are. One forward and
backward per batch: `neuron_group_size` is ignored, and the model runs in its own dtype
(`OptinConfig.dtype` sets only the OPTIN engines' precision).

The published code squares the gradient of each dataloader batch's mean loss; this follows the
paper's per-example sum.

PTF's mask search against `optin_hf.allocate.allocate`, which this criterion shares: both rank
all heads and all neurons globally by score, and for each number k of kept heads keep the top k
and fill the rest of the MAC budget with the top neurons, choosing the k with the largest kept
Fisher sum (PTF's diagonal estimate of the loss increase is the pruned sum). The MAC formulas
and, for text, the budget (heads and FFNs only, at the average length) are PTF's. They differ in:
- `neurons_multiple_of` (default 8): allocate ranks blocks of that many neurons of a layer by
  their mean score, so each layer keeps a multiple of it; PTF ranks single neurons
  (`neurons_multiple_of=1` matches it);
- allocate drops splits that leave more than 1% of the budget unused when another split fills
  it; PTF compares every split;
- allocate also tries k = 0 (no head kept); PTF starts at one head.
PTF's mask rearrangement follows the search: the scores carry the per-example gradients, and
`allocate.rearrange_masks` re-picks which units each layer keeps (same counts) under the
block-diagonal Fisher (scores loaded from a file have no gradients and are not rearranged).
PTF's mask tuning (per-unit scales by least squares) is `OptinConfig(reconstruct="scales")`
(`optin_hf.reconstruct`). Not implemented: PTF's latency-constrained search, and token pruning
(Fisher gives no token scores).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import ClassVar, Iterator

import torch
import torch.nn.functional as F
from torch import nn

from ..arch import ArchAdapter
from ..capture import scoring_forward
from ..config import OptinConfig
from ..hooks import apply_masks
from .base import ConfiguredImportance
from .scores import ImportanceScores


@contextmanager
def _frozen(model: nn.Module) -> Iterator[None]:
    """Parameters stop requiring grad: only the masks get gradients, and no `.grad` is left."""
    params = [p for p in model.parameters() if p.requires_grad]
    for p in params:
        p.requires_grad_(False)
    try:
        yield
    finally:
        for p in params:
            p.requires_grad_(True)


# The label value that marks unlabelled pixels, by config attribute (SegFormer's, Mask2Former's); 255 otherwise.
IGNORE_INDEX_ATTRS = ("semantic_loss_ignore_index", "ignore_value")


def ignore_index(config) -> int:
    return next((int(v) for a in IGNORE_INDEX_ATTRS if (v := getattr(config, a, None)) is not None), 255)


def pixel_losses(logits: torch.Tensor, labels: torch.Tensor | None, ignore: int = 255) -> torch.Tensor:
    """Per-image mean per-pixel loss ([batch]) of segmentation logits [batch, classes, h, w] against label
    maps [batch, H, W] (the logits upsampled to them, pixels labelled `ignore` left out), or against the
    model's own predicted class per pixel when `labels` is None. One class: the binary cross-entropy."""
    valid = torch.ones_like(logits[:, 0], dtype=torch.bool)
    if labels is not None:
        labels = labels.to(logits.device)
        if labels.dim() != 3:
            raise ValueError(
                f"importance='fisher' on a segmentation model needs a label map per image ([height, width] class ids), "
                f"not labels of shape {tuple(labels.shape[1:])}; or pass the images without labels."
            )
        logits = F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False)
        valid = (labels != ignore) & (labels >= 0)
    if logits.shape[1] == 1:
        target = (logits.detach()[:, 0] > 0) if labels is None else labels
        loss = F.binary_cross_entropy_with_logits(logits[:, 0], target.to(logits.dtype), reduction="none")
    else:
        target = logits.detach().argmax(1) if labels is None else labels.long().masked_fill(~valid, 0)
        loss = F.cross_entropy(logits, target, reduction="none")
    valid = valid.to(loss.dtype)
    return (loss * valid).flatten(1).sum(1) / valid.flatten(1).sum(1).clamp_min(1)


def example_losses(logits: torch.Tensor, labels: torch.Tensor | None, config=None) -> torch.Tensor:
    """Per-example loss ([batch]) of logits ([batch, num_labels], or a segmenter's [batch, classes, h, w]:
    `pixel_losses`) against labels, or against the model's own predicted class when `labels` is None.
    The loss is the one the model's task trains with, as its `config` says (None: a single-label classifier's)."""
    logits = logits.float()
    if logits.dim() > 2:
        return pixel_losses(logits, labels, ignore_index(config))
    if getattr(config, "problem_type", None) == "multi_label_classification":  # an independent sigmoid per label
        target = (logits.detach() > 0) if labels is None else labels.to(logits.device)
        return F.binary_cross_entropy_with_logits(logits, target.to(logits.dtype), reduction="none").mean(-1)
    if logits.shape[-1] == 1:
        if labels is None:
            raise ValueError(
                "importance='fisher' on a regression model needs labelled calibration data (a 'labels' or 'label' "
                "value per example): the squared error to its own prediction has zero gradient."
            )
        return (logits.squeeze(-1) - labels.to(logits)).pow(2)
    target = logits.detach().argmax(-1) if labels is None else labels.to(logits.device).long()
    return F.cross_entropy(logits, target, reduction="none")


@dataclass(frozen=True)
class FisherImportance(ConfiguredImportance):
    """No settings of its own: the loss is the task head's, and one backward per batch scores all."""

    name: ClassVar[str] = "fisher"
    needs_grad: ClassVar[bool] = True
    needs_labels: ClassVar[bool] = True

    def __call__(self, model: nn.Module, adapter: ArchAdapter, batches, config: OptinConfig) -> ImportanceScores:
        if model.base_model is model:
            raise ValueError(
                f"importance='fisher' needs the task model's logits, and {type(model).__name__} is a bare encoder: "
                "load the fine-tuned task model (e.g. AutoModelForSequenceClassification / "
                "AutoModelForImageClassification), or score the encoder with importance='optin' or 'magnitude'."
            )
        num_layers = len(adapter.layers_of(model))
        units = {"head": adapter.num_heads(model.config), "neuron": adapter.intermediate_size(model.config)}
        # a kind with no unit (ConvNeXt's heads) has no mask to differentiate
        enabled = {"head": config.prune_heads and units["head"] > 0, "neuron": config.prune_neurons and units["neuron"] > 0}
        scores = {kind: torch.zeros(num_layers, n, dtype=torch.float64) for kind, n in units.items()}
        device = next(model.parameters()).device
        per_example: dict[str, list[torch.Tensor]] = {kind: [] for kind in units if enabled[kind]}
        with torch.enable_grad(), _frozen(model):
            for batch in batches:
                labels = batch.get("labels")
                inputs = {k: v for k, v in batch.items() if k != "labels"}
                size = next(iter(inputs.values())).shape[0]
                # masks[kind]: [num_layers, batch, units], one row of ones per example
                masks = {k: torch.ones(num_layers, size, n, device=device, requires_grad=True) for k, n in units.items() if enabled[k]}
                with apply_masks(model, adapter, masks.get("head"), masks.get("neuron")):
                    loss = example_losses(adapter.logits_of(scoring_forward(model, inputs)), labels, model.config).sum()
                grads = torch.autograd.grad(loss, list(masks.values()))
                for kind, grad in zip(masks, grads):
                    scores[kind] += grad.double().pow(2).sum(1).cpu()
                    per_example[kind].append(grad.detach().transpose(0, 1).cpu())
        grads = {kind: torch.cat(parts) for kind, parts in per_example.items()}
        return ImportanceScores(scores["head"], scores["neuron"], self.name, example_grads=grads)
