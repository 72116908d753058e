import pytest
import torch
from tiny import tiny_model

from optin_hf.arch import get_adapter
from optin_hf.engine.token_losses import capture_token_grams, reference_token_losses


@torch.no_grad()
def by_hand(model, pixels: torch.Tensor, layer: int | None = None, position: int | None = None):
    """Layer features ([batch, tokens, dim] each) and logits, dropping token `position` before `layer`."""
    vit = model.base_model
    hidden, features = vit.embeddings(pixels), []
    for i, block in enumerate(vit.layers):
        if i == layer:
            hidden = torch.cat([hidden[:, :position], hidden[:, position + 1 :]], dim=1)
        features.append(block.layernorm_before(hidden))
        hidden = block(hidden)
    return features, model.classifier(vit.layernorm(hidden)[:, 0])


def token_md(dense: torch.Tensor, masked: torch.Tensor) -> float:
    """The method note's token MD, literally: [tokens, batch, dim] -> per-token Grams -> mean -> SSD."""
    grams = []
    for feature in (dense, masked):
        rows = torch.nn.functional.normalize(feature.permute(1, 0, 2), dim=-1)
        grams.append((rows @ rows.transpose(1, 2)).mean(0))
    return float((grams[0] - grams[1]).pow(2).sum())


@pytest.mark.parametrize("arch", ["vit", "deit"])
def test_token_losses_match_a_hand_computation(arch):
    model = tiny_model(arch)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(3)
    batches = [{"pixel_values": torch.randn(3, 3, 16, 16, generator=g)} for _ in range(2)]
    raw = reference_token_losses(model, adapter, batches, capture_token_grams(model, adapter, batches), temperature=4.0)
    prefix, num_layers = adapter.num_prefix_tokens, 3
    assert raw.md.shape == raw.kl.shape == (num_layers, adapter.default_seq_len(model.config))
    assert (raw.md[0] == 0).all() and (raw.md[:, :prefix] == 0).all() and (raw.kl[:, :prefix] == 0).all()
    assert (raw.md[1:, prefix:] > 0).all() and (raw.kl[1:, prefix:] > 0).all()
    dense = [by_hand(model, b["pixel_values"]) for b in batches]
    for layer, position in [(1, prefix), (1, 9), (2, 16)]:
        masked = [by_hand(model, b["pixel_values"], layer, position) for b in batches]
        judged = range(layer + 1, num_layers) if layer < num_layers - 1 else [layer]
        md = sum(token_md(d[0][z], m[0][z]) for d, m in zip(dense, masked) for z in judged)
        p = torch.softmax(torch.cat([d[1] for d in dense]), -1)
        q = torch.softmax(torch.cat([m[1] for m in masked]), -1)
        kl = float((p * (p.log() - q.log())).sum()) * 16
        assert raw.md[layer, position].item() == pytest.approx(md, rel=1e-4)
        assert raw.kl[layer, position].item() == pytest.approx(kl, rel=1e-4)
