"""`ArchAdapter`: where one model family keeps its heads, FFN neurons and recorded features.

Everything architecture-specific lives here: module paths as data, and the geometry (which
parameters a head or an FFN unit owns, how to cut them out, what a unit costs in MACs) as
methods with the standard multi-head attention / two-matrix FFN as their defaults. The rest
of optin-hf reads models only through an adapter, so adding a family means adding one adapter
(a subclass where its geometry differs) and `register_adapter`.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

from ..losses import KLOutputs
from .capabilities import Capabilities, Feature
from .projection import Projection, Slice, num_features, owned_norms, select_features, slice_features

# The layer pieces take, after their own arguments, the rest of the layer's call as the layer
# received it (`*args, **kwargs` after the hidden states: BERT's attention mask, a Swin stage's map
# size, SegFormer's height and width); a piece ignores what it does not need.
# (layer, input of the attention output projection, layer input, *call) -> input of the FFN block
FinishAttention = Callable[..., torch.Tensor]
# (layer, input of the FFN block, *call) -> layer output
FeedForward = Callable[..., torch.Tensor]
# (layer, output of the FFN down projection, input of the FFN block, *call) -> layer output
FinishFeedForward = Callable[..., torch.Tensor]
# (task model, last layer's output hidden states) -> logits
Classifier = Callable[[nn.Module, torch.Tensor], torch.Tensor]


def _no_logits(model: nn.Module, hidden: torch.Tensor) -> None:
    return None


def get_submodule(root: nn.Module, path: str) -> nn.Module:
    return root.get_submodule(path) if path else root


def set_submodule(root: nn.Module, path: str, module: nn.Module) -> None:
    parent, _, name = path.rpartition(".")
    setattr(get_submodule(root, parent), name, module)


def pair(value) -> tuple[int, int]:
    """(height, width) of a config's image or patch size, given as one side or as a pair."""
    return (int(value), int(value)) if isinstance(value, int) else (int(value[0]), int(value[1]))


ImageSize = tuple[int, int]  # (height, width) of the images a vision model's MACs and tokens are counted at


def num_patches(config, image_size: ImageSize | None = None) -> int:
    """Patches a ViT-style patch embedding (a conv whose stride is its kernel) makes of an `image_size`
    image (default: `config.image_size`)."""
    (height, width), (patch_h, patch_w) = pair(image_size or config.image_size), pair(config.patch_size)
    return (height // patch_h) * (width // patch_w)


def checked_image_size(value) -> ImageSize:
    """`value` (one side, or (height, width)) as a (height, width) pair of positive ints, or a ValueError."""
    sides = [value] if isinstance(value, int) else list(value) if isinstance(value, (tuple, list, torch.Size)) else None
    if not sides or len(sides) > 2 or any(isinstance(s, bool) or not isinstance(s, int) or s < 1 for s in sides):
        raise ValueError(f"image_size={value!r} is not an image size: give one side or (height, width), positive integers.")
    return pair(sides[0]) if len(sides) == 1 else (int(sides[0]), int(sides[1]))


def paper_head_macs(seq_len: float, hidden: int, head_dim: int) -> float:
    """One head at `seq_len` tokens: q, k, v (3·s·d·dh), scores and context (2·s²·dh), its output columns (s·dh·d)."""
    return 3 * seq_len * hidden * head_dim + 2 * seq_len * seq_len * head_dim + seq_len * head_dim * hidden


def paper_neuron_macs(seq_len: float, hidden: int) -> float:
    """One FFN neuron at `seq_len` tokens: its up row and its down column (2·s·d)."""
    return 2 * seq_len * hidden


@dataclass(frozen=True)
class LayerGeometry:
    """One layer's prunable units: `heads` heads of `head_dim` features each over a `hidden`-wide
    residual stream, and `neurons` FFN neurons. Layers of one model may differ (Swin's stages)."""

    heads: int
    head_dim: int
    hidden: int
    neurons: int


# transformers 5 names the parts of its vision encoder layers (ViT, DeiT, Swin, SegFormer) alike.
VISION_LAYER_PATHS = dict(
    attn_core="attention",
    query="attention.q_proj",
    key="attention.k_proj",
    value="attention.v_proj",
    attn_out="attention.o_proj",
    ffn_up="mlp.fc1",
    ffn_down="mlp.fc2",
    ffn_input="layernorm_after",
    head_count_attrs=("num_attention_heads",),
)


# What names a family's heads: required with Capabilities(heads=True), left out without.
ATTENTION_FIELDS = ("attn_core", "query", "key", "value", "attn_out")


@dataclass(frozen=True)
class ArchAdapter:
    """Module paths of one architecture family.

    `layers` is relative to `model.base_model`; the other paths are relative to one layer.
    `ffn_input` is the module whose first input is the FFN sublayer's input, which is also the
    residual that sublayer adds to (the attention sublayer's residual is the layer input).
    The attention fields (`ATTENTION_FIELDS`) name a family's heads, and only a family with heads
    gives them; one without (`Capabilities(heads=False)`, ConvNeXt) leaves them out and keeps no
    head. `attn_core` is the module that computes the heads; a layer that keeps no head gets it
    replaced by `EmptyAttention`. When `attn_out` lies inside `attn_core`, the replacement
    keeps that projection so the layer still adds its bias.

    The fast engine runs a layer in pieces so it can start inside it: `finish_attention`
    (from the heads' concatenated output to the FFN input) and `feed_forward` (from the FFN
    input to the layer output); `finish_feed_forward` (from the down projection's output to
    the layer output), optional, lets it score a neuron without rerunning its FFN (the down
    projection is linear); `classifiers` maps a task model's class name to the part of its
    forward after the last layer, which reads the first `pooled_tokens` tokens of each example
    (the fast engine hands it only those when it packs examples end to end).

    `chained_layers`: each layer's output is the next layer's input and the task head reads the
    last layer's output only. A family whose model runs more between its layers (Swin's patch
    mergings, SegFormer's stage norms and patch embeddings) or whose head reads several layers
    (SegFormer's decode head, Mask2Former's pixel decoder) sets it False: the fast engine and the
    refit then run the model's own forward around the layers they replay (`engine.replay`), so
    it needs no `classifiers`. `token_order` pairs the attention output projection's rows with
    the residual's where the layer runs that projection on other rows (Swin's windows).
    `output_is_ffn_sum`: the layer's output is its FFN sum, the FFN residual plus the down projection's output
    with nothing after (a pre-norm layer: Llama, GPT-2), so the weights refit reads that target off the recorded
    dense run instead of rerunning the dense FFN (a post-norm layer, BERT, normalises the sum: False there).

    The geometry methods below (`head_slices`, `slim_heads`, `head_macs`, their neuron twins)
    hold the standard multi-head attention and two-matrix FFN; a family that differs (KV heads
    shared by a group of query heads, a relative-position-bias table per head, a gated FFN)
    overrides them in a subclass, and slimming and `count_macs` follow.

    `capabilities` declares what the family supports beyond heads, neurons and the reference
    engine (the fast engine, each repair, token mode); every refusal of what it does not declare
    comes from there (`optin_hf.arch.require`). Construction checks that the declaration is
    backed by the fields it needs (the layer pieces, a patch embedding).
    """

    model_types: tuple[str, ...]
    layers: str
    ffn_up: str
    ffn_down: str
    ffn_input: str
    feature: str
    # the heads: given by a family with heads, left out by one without (see `ATTENTION_FIELDS`)
    attn_core: str = ""
    query: str = ""
    key: str = ""
    value: str = ""
    attn_out: str = ""
    head_count_attrs: tuple[str, ...] = ()
    all_head_size_attr: str | None = None
    patch_embedding: str | None = None
    num_prefix_tokens: int = 1
    pooled_tokens: int = 1
    finish_attention: FinishAttention | None = None
    feed_forward: FeedForward | None = None
    finish_feed_forward: FinishFeedForward | None = None
    classifiers: Mapping[str, Classifier] = field(default_factory=dict, hash=False, compare=False)
    chained_layers: bool = True
    output_is_ffn_sum: bool = False
    unit_names: tuple[str, str] = ("attention heads", "FFN neurons")  # what the report calls a head and a neuron
    fixed_parts: str = "the patch embedding"  # what `fixed_macs` counts, as an unreachable budget's error names it
    # Text examples may be laid end to end in one row by the fast engine (positions embedded before layer 0,
    # attention within each example): False for a decoder, whose causal mask and rotary positions are per row.
    packs_examples: bool = True
    capabilities: Capabilities = Capabilities()

    def __post_init__(self) -> None:
        """Refuse a declaration the fields cannot back, naming the missing field: a feature declared
        without it would fail deep inside a scoring run or a refit instead."""
        declared = self.capabilities
        family = self.model_types[0] if self.model_types else "new"
        if not declared.heads and any(getattr(self, name) for name in ATTENTION_FIELDS):
            named = [name for name in ATTENTION_FIELDS if getattr(self, name)]
            raise ValueError(
                f"The {family} adapter declares Capabilities(heads=False) but names attention modules ({', '.join(named)}): "
                "a family without heads leaves them out."
            )
        needs: list[tuple[str, str, object]] = []  # (feature, field it needs, the field's value)
        if declared.heads:
            needs += [("heads=True, the default", name, getattr(self, name) or None) for name in ATTENTION_FIELDS]
        if declared.fast_engine:
            needs += [("fast_engine=True", name, getattr(self, name)) for name in ("finish_attention", "feed_forward")]
        for mode in [mode for mode in ("weights", "scales") if mode in declared.repairs]:
            needs += [(f"repairs with {mode!r}", name, getattr(self, name))
                      for name in ("finish_attention", "feed_forward", "finish_feed_forward")]
        if declared.readers:  # the readers are refit inside the weights refit's conv path
            needs += [("readers=True", "refit_conv", self.refit_conv)]
        if declared.tokens:
            needs += [("tokens=True", "patch_embedding", self.patch_embedding),
                      ("tokens=True", "num_prefix_tokens", self.num_prefix_tokens or None)]
        missing = [(feature, name) for feature, name, value in needs if value is None]
        if missing:
            feature, name = missing[0]
            raise ValueError(
                f"The {family} adapter declares Capabilities({feature}) but gives no {name}: give {name}, or leave "
                "that capability undeclared."
            )

    def supports(self, feature: Feature) -> bool:
        """Whether the family declares `feature` (`Capabilities`)."""
        return self.capabilities.supports(feature)

    @property
    def is_vision(self) -> bool:
        return self.patch_embedding is not None

    @property
    def out_inside_core(self) -> bool:
        return self.attn_out.startswith(self.attn_core + ".")

    def check_config(self, config) -> None:
        """Refuse a config whose layout this adapter cannot prune, naming the config field and the fix.
        `get_adapter` runs it before any module is looked up, where a missing module would read as a
        transformers version change. Every config passes here; a family with unsupported variants
        (ResNet's basic blocks) overrides it."""

    def layers_of(self, model: nn.Module) -> nn.ModuleList:
        return get_submodule(model.base_model, self.layers)

    def layer_geometry(self, config) -> tuple[LayerGeometry, ...]:
        """Each layer's head count, head size, hidden size and FFN width; by default every layer
        has the config's. Masks and scores are [num_layers, the widest layer's units]: a
        narrower layer's units past its own count are padding, never scored, kept or counted."""
        heads = int(config.num_attention_heads)
        head_dim = int(getattr(config, "head_dim", None) or config.hidden_size // heads)
        neurons = int(getattr(config, "intermediate_size", None) or config.hidden_dim)
        return (LayerGeometry(heads, head_dim, int(config.hidden_size), neurons),) * int(config.num_hidden_layers)

    def num_heads(self, config) -> int:
        """Width of head masks and scores: the most heads a layer has."""
        return max(g.heads for g in self.layer_geometry(config))

    def head_dim(self, config, layer: int = 0) -> int:
        return self.layer_geometry(config)[layer].head_dim

    def intermediate_size(self, config) -> int:
        """Width of neuron masks and scores: the widest FFN of a layer."""
        return max(g.neurons for g in self.layer_geometry(config))

    def kept_heads(self, layer: nn.Module, config) -> int:
        """Heads a (possibly slimmed) layer runs, read off its query projection."""
        if not self.supports("heads") or isinstance(get_submodule(layer, self.attn_core), EmptyAttention):
            return 0
        return num_features(get_submodule(layer, self.query), "out") // self.layer_head_dim(layer, config)

    def layer_head_dim(self, layer: nn.Module, config) -> int:
        """Features per head of `layer` (a module with heads); a family whose layers differ reads it off the layer."""
        return self.head_dim(config)

    def kept_neurons(self, layer: nn.Module) -> int:
        return num_features(get_submodule(layer, self.ffn_up), "out")

    def head_slices(self, config=None) -> tuple[Slice, ...]:
        """What a head owns: its query, key and value rows and its attention-output columns. `config` is
        for a family whose slice widths follow it (grouped KV heads: a group owns g·dh query rows)."""
        return (Slice(self.query, "out"), Slice(self.key, "out"), Slice(self.value, "out"), Slice(self.attn_out, "in"))

    def neuron_slices(self, config=None) -> tuple[Slice, ...]:
        """What an FFN neuron owns: its up-projection row and its down-projection column."""
        return (Slice(self.ffn_up, "out"), Slice(self.ffn_down, "in"))

    def input_slices(self, layer: nn.Module, config, sublayer: str) -> tuple[Slice, ...]:
        """The input projections of `sublayer` ("attn_out": the heads' query, key and value; "ffn_down": the FFN's up
        and gate), which `reconstruct_inputs` refits: the output-side slices of its units that are Linear or Conv1D
        layers, each a linear map of its own input (a depthwise conv after the up projection, SegFormer's, is not)."""
        slices = self.head_slices(config) if sublayer == "attn_out" else self.neuron_slices(config)
        return tuple(part for part in slices
                     if part.side == "out" and isinstance(get_submodule(layer, part.path), (nn.Linear, Conv1D)))

    def slim_heads(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        """Keep only heads `keep` (sorted indices) of `layer`, in place.

        A layer that keeps none gets `EmptyAttention`, which still adds the output bias.
        """
        if not self.supports("heads"):
            return  # no heads: nothing to cut
        head_dim = self.layer_head_dim(layer, config)
        _slim(layer, self.head_slices(config), keep, head_dim)
        if len(keep) == 0:
            inside = self.attn_out.removeprefix(self.attn_core + ".") if self.out_inside_core else None
            out = get_submodule(layer, self.attn_out)
            set_submodule(layer, self.attn_core, EmptyAttention(out, inside) if inside else EmptyAttention())
            return
        core = get_submodule(layer, self.attn_core)
        for attr in self.head_count_attrs:
            setattr(core, attr, len(keep))
        if self.all_head_size_attr:
            setattr(core, self.all_head_size_attr, len(keep) * head_dim)

    def slim_neurons(self, layer: nn.Module, keep: torch.Tensor, config) -> None:
        """Keep only FFN neurons `keep` (sorted indices) of `layer`, in place."""
        _slim(layer, self.neuron_slices(config), keep, 1)

    def head_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        """MACs of one head of layer `layer` when it runs `seq_len` tokens (the paper's formula).

        The MAC methods take the images' `image_size` too (None: the config's): a family whose layers
        run maps of their own sizes (Swin's stages, a CNN's, SegFormer's) counts them from it, and
        refuses a `seq_len` other than `default_seq_len` at that size."""
        geometry = self.layer_geometry(config)[layer]
        return paper_head_macs(seq_len, geometry.hidden, geometry.head_dim)

    def neuron_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        """MACs of one FFN neuron of layer `layer` when it runs `seq_len` tokens (the paper's formula)."""
        return paper_neuron_macs(seq_len, self.layer_geometry(config)[layer].hidden)

    def pair_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        """MACs of one (kept head, kept neuron) pair of layer `layer`, beyond what each costs alone.

        0 here: heads and FFN neurons never meet in one matmul. A CNN bottleneck's middle conv
        reads the reduce channels ("heads") and writes the mid channels ("neurons"), so it costs
        k·k·H·W per pair; `count_macs` and the budget search add kept heads x kept neurons x this.
        """
        return 0.0

    def shared_attention_macs(self, seq_len: float, config, layer: int = 0, *, image_size: ImageSize | None = None) -> float:
        """MACs of layer `layer`'s attention that serve all its heads, counted in `fixed_macs` while
        it keeps one head and saved when it keeps none (SegFormer's spatial-reduction conv): the
        budget search spends what that frees. 0 here."""
        return 0.0

    def unit_weight_norms(self, layer: nn.Module, config) -> tuple[torch.Tensor, torch.Tensor]:
        """Squared L2 norms of the weights each head ([heads]) and each neuron ([neurons]) of `layer`
        owns (the magnitude criterion), read through `head_slices` / `neuron_slices`: a head's q/k/v
        rows and output columns, a neuron's FFN up row and down column (biases left out)."""

        def norms(slices: tuple[Slice, ...], units: int, width: int) -> torch.Tensor:
            return sum(owned_norms(get_submodule(layer, part.path), part, units, width) for part in slices)

        per_neuron = norms(self.neuron_slices(config), self.kept_neurons(layer), 1)
        if not self.supports("heads"):
            return per_neuron.new_zeros(0), per_neuron
        return norms(self.head_slices(config), self.kept_heads(layer, config), self.layer_head_dim(layer, config)), per_neuron

    def token_order(self, layer: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        """The attention output projection's input or output `x` (its rows as `layer` runs them) in the
        layer input's token order, [batch, tokens, features], given the rest of the layer's call: row
        t then pairs with token t of the residual the projection's output is added to. The identity
        here; Swin runs the projection on shifted windows padded to whole windows, and reverses them."""
        return x

    def projection(self, layer: nn.Module, sublayer: str) -> Projection:
        """The attention output (`sublayer="attn_out"`) or FFN down (`"ffn_down"`) projection of a
        layer, as the refit and the fast engine read it (a Linear, a Conv1D or a 1x1 conv, with or
        without a bias). A family whose output projection is more than one module overrides this."""
        return Projection(get_submodule(layer, getattr(self, sublayer)))

    def branch_scale(self, layer: nn.Module, sublayer: str) -> torch.Tensor | None:
        """The per-channel factor [hidden] that multiplies `sublayer`'s ("attn_out" or "ffn_down")
        output before the residual adds it (a layer scale), or None where the output is added as
        it is. The refit fits the scaled branch to the residual stream's target."""
        return None

    @property
    def refit_sublayers(self) -> tuple[str, ...]:
        """The sublayers ("attn_out", "ffn_down") whose output projection the least-squares refit fits: both in a
        family with heads, the FFN's alone in one without. A family whose heads' output projection feeds a
        nonlinearity before the residual adds it (ResNet's 3x3 conv, then BatchNorm and ReLU) leaves it out."""
        return ("attn_out", "ffn_down") if self.supports("heads") else ("ffn_down",)

    def link_refits(self, model: nn.Module) -> tuple[list[str], list[str]]:
        """The modules (paths from the task model) that read a stage's output where the layers do not chain, which the
        weights refit fits after the layers (`optin_hf.link_refit`): (the later stages' input convs, in stage order;
        the task head's per-stage readers). None here; SegFormer's."""
        return [], []

    @property
    def refit_conv(self) -> str | None:
        """A conv layer (its `convolution`, the heads' output projection `attn_out`, then its BatchNorm
        `normalization`) that the weights refit fits first, to the dense conv's output at the channels it keeps
        (`kept_conv_outputs`): None here; ResNet's 3x3 conv."""
        return None

    def kept_conv_outputs(self, layer: nn.Module) -> torch.Tensor:
        """The dense output channels that the slim `refit_conv` of `layer` keeps (a family with a `refit_conv`)."""
        raise NotImplementedError(f"{type(self).__name__} refits no conv layer")

    def ffn_residual(self) -> tuple[str, str]:
        """Where the FFN sublayer's residual (what its branch is added to) is read, in the dense and the slim
        layer alike: (module path, "in" for its first input or "out" for its output). By default the FFN
        input (`ffn_input`'s input); a family whose branch adds to something else (ResNet's shortcut) overrides it."""
        return self.ffn_input, "in"

    def stream_rows(self, layer: nn.Module, sublayer: str, x: torch.Tensor) -> torch.Tensor:
        """A residual-stream tensor of `layer` (a residual, the layer's output) as [positions, hidden] rows in
        the order of `sublayer`'s projection output rows (`Projection.rows`); a family whose stream is laid out
        otherwise (ConvNeXt: channels-first maps, a channels-last Linear) overrides it."""
        return self.projection(layer, sublayer).rows(x)

    def logits_of(self, output) -> torch.Tensor | None:
        """What the KL term compares, from a model's forward output: its `logits` (None for a bare encoder).
        A family whose task head gives no single logits tensor (Mask2Former) derives them here."""
        return getattr(output, "logits", None)

    def kl_outputs(self, output, batch: Mapping[str, torch.Tensor]) -> KLOutputs | None:
        """What the KL compares for one batch, from the model's forward `output` on `batch`:
        logits [examples, positions, classes] with the valid positions marked (a classifier's
        one pooled position, every pixel of a segmentation map). A family whose valid positions
        depend on its inputs (a language model's real tokens, from `batch`) overrides this."""
        return KLOutputs.of(self.logits_of(output))

    def classifier_of(self, model: nn.Module) -> Classifier | None:
        """How `model` turns its last hidden states into logits; None if unknown here.

        A bare encoder (`model.base_model is model`) has no logits, so it needs none.
        """
        if model.base_model is model:
            return _no_logits
        return self.classifiers.get(type(model).__name__)

    def image_size(self, config, given=None) -> ImageSize | None:
        """(height, width) a vision model's MACs and tokens are counted at: `given` (the calibration
        images', or `count_macs`'s argument), else the size its config states; None for text.

        The model runs images of other sizes than its config says (DINOv2's Hub configs say 518, its
        processors crop 224; a SegFormer's or a ResNet's config says none), so the pruner passes the
        size of the images it calibrates on. A family whose size lives elsewhere (a backbone's config)
        overrides this."""
        if not self.is_vision:
            if given is not None:
                raise ValueError(f"image_size={given!r} is for image models: a {config.model_type} model's MACs follow seq_len.")
            return None
        size = given if given is not None else getattr(config, "image_size", None)
        if size is None:
            raise ValueError(
                f"This {config.model_type} model's MACs depend on the image size, and its config states none: pass "
                "count_macs(model, image_size=(height, width)), or calibration images (or OptinConfig(image_size=...)) "
                "to the pruner."
            )
        return checked_image_size(size)

    def default_seq_len(self, config, image_size: ImageSize | None = None) -> int | None:
        """Tokens per image for vision models (patches + prefix tokens) at `image_size` (None: the
        config's, see `image_size`); None for text."""
        if not self.is_vision:
            return None
        return num_patches(config, self.image_size(config, image_size)) + self.num_prefix_tokens

    def standard_config(self, config, masks):
        """The family's own config of the model that `masks` make of a dense `config`, when plain transformers
        builds that slim model (a decoder LLM whose layers keep the same counts), else None: the checkpoint then
        saves optin-hf's per-layer config."""
        return None

    def dense_config(self, config, masks):
        """The dense config of a slim checkpoint's `config`: `config` itself, unless it is a `standard_config`,
        whose sizes are the slim ones."""
        return config

    def fixed_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        """MACs of the encoder that no unit owns, so no budget can cut (the patch embedding), at `image_size`."""
        return self.patch_embedding_macs(model, image_size)

    def patch_embedding_macs(self, model: nn.Module, image_size: ImageSize | None = None) -> int:
        if self.patch_embedding is None:
            return 0
        conv = get_submodule(model.base_model, self.patch_embedding)
        kernel = conv.weight[0].numel()  # in_channels * P * P
        return num_patches(model.config, self.image_size(model.config, image_size)) * kernel * conv.out_channels


def _slim(layer: nn.Module, slices: tuple[Slice, ...], keep: torch.Tensor, default_width: int) -> None:
    for part in slices:
        module = get_submodule(layer, part.path)
        set_submodule(layer, part.path, select_features(module, slice_features(module, part, keep, default_width), part.side))


class EmptyAttention(nn.Module):
    """Stands in for the attention of a layer that keeps no head.

    It returns what the layer's attention would with zero heads: nothing from the heads, so
    only the output projection's bias (when that projection lives inside the attention, where
    it stays under its own name, so `ArchAdapter.attn_out` still finds it).
    """

    def __init__(self, out_proj: nn.Linear | None = None, name: str = "out_proj"):
        super().__init__()
        self.out_name = name if out_proj is not None else None
        if out_proj is not None:
            self.add_module(name, out_proj)

    def forward(self, hidden_states: torch.Tensor, *args, **kwargs) -> tuple[torch.Tensor, None]:
        empty = hidden_states.new_zeros(*hidden_states.shape[:-1], 0)
        return (getattr(self, self.out_name)(empty) if self.out_name else empty), None
