"""Mask2Former (universal segmentation) with a Swin backbone: the backbone's heads and MLP neurons
are pruned exactly as a Swin classifier's (`swin.SwinAdapter`); the pixel decoder and the
transformer decoder stay dense.

The geometry is read from `config.backbone_config`. MACs (`count_macs`) are the backbone's, as
torch's FLOP counter sees them at the calibration images' size (or `count_macs`'s `image_size`,
else `backbone_config.image_size`, Swin's default 224 whatever the model is fed): the pixel
decoder and the transformer decoder are not counted (no budget can cut them), so `mac_constraint` is a fraction
of the backbone's MACs. The MD features are the backbone blocks' outputs; the KL compares the
semantic map that Mask2Former's semantic post-processing computes (`semantic_logits`).

The fast engine and the refits run the backbone's blocks with Swin's layer pieces (the backbone
pads a map smaller than a window rather than shrinking the window: `always_partition`). Every
stage feeds the pixel decoder, so a scoring run finishes with the model's own forward from the
replayed blocks (`ArchAdapter.chained_layers`): the pixel decoder and the transformer decoder
make the semantic map the KL compares, as in a plain forward.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

import torch

from .swin import SWIN, SwinAdapter

BACKBONE = "pixel_level_module.encoder"  # relative to Mask2FormerModel (the task model's base_model)


def semantic_logits(class_queries_logits: torch.Tensor, masks_queries_logits: torch.Tensor) -> torch.Tensor:
    """Per-pixel class log-scores [batch, classes, height, width] at the masks' resolution.

    Mask2Former's semantic map sums, over queries, each query's class probabilities (softmax
    without the last, "no object", class; class_queries_logits: [batch, queries, classes + 1])
    times its mask probability (sigmoid of masks_queries_logits: [batch, queries, height, width]).
    Its log, softmaxed over classes, is that map normalised per pixel, so a KL over dim 1 compares
    the two models' per-pixel class distributions and the argmax is the predicted segmentation.
    """
    classes = class_queries_logits.float().softmax(-1)[..., :-1]
    masks = masks_queries_logits.float().sigmoid()
    semantic = torch.einsum("bqc,bqhw->bchw", classes, masks)
    return semantic.clamp_min(torch.finfo(semantic.dtype).tiny).log()


@dataclass(frozen=True)
class Mask2FormerAdapter(SwinAdapter):
    """The Swin adapter pointed at Mask2Former's backbone; see the module docstring."""

    def swin_config(self, config):
        backbone = getattr(config, "backbone_config", None)
        if getattr(backbone, "model_type", None) != "swin":
            found = getattr(backbone, "model_type", None) or getattr(config, "backbone", None)
            raise ValueError(
                f"optin-hf prunes the Swin backbone of a Mask2Former, and this one's backbone is {found!r}: "
                "use a Mask2Former with a transformers Swin backbone (e.g. facebook/mask2former-swin-tiny-ade-semantic)."
            )
        return backbone

    def check_config(self, config) -> None:
        self.swin_config(config)  # a backbone that is not Swin is refused with the reason

    def window_side(self, swin_config, height: int, width: int) -> int:
        """The configured window on any map: the backbone runs its layers with always_partition=True,
        which pads a map smaller than a window instead of shrinking the window."""
        return swin_config.window_size

    def logits_of(self, output) -> torch.Tensor | None:
        """The semantic map's log-scores; None for a bare Mask2FormerModel, which predicts no classes."""
        if getattr(output, "class_queries_logits", None) is None:
            return None
        return semantic_logits(output.class_queries_logits, output.masks_queries_logits)


# Swin's adapter on the backbone's paths: the same layers, under the universal-segmentation model.
MASK2FORMER = Mask2FormerAdapter(**{
    **{f.name: getattr(SWIN, f.name) for f in fields(SWIN) if f.init},
    "model_types": ("mask2former",),
    "layers": f"{BACKBONE}.swin.{SWIN.layers}",
    "patch_embedding": f"{BACKBONE}.swin.{SWIN.patch_embedding}",
})
