"""Token candidates: the hand-computed losses, split across processes, killed and resumed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from tiny import tiny_model
from token_worker import token_batches

from optin_hf import OptinConfig
from optin_hf.arch import get_adapter
from optin_hf.engine import compute_raw_losses, token_losses
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


TESTS = Path(__file__).parent
CANDIDATES = 2 * 16  # layers 1..2 of the tiny ViT, its 16 patch positions (the class token stays)


def worker_env() -> dict[str, str]:
    """The worker imports optin_hf and tests/tiny.py; one thread each, the machine has few cores."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def two_process_run(tmp_path_factory):
    """A 2-process CPU (gloo) run of the token worker, started with the module so that its slow
    start (two interpreters importing torch) overlaps the in-process tests."""
    root = tmp_path_factory.mktemp("two-processes")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "token_worker.py"), str(root / "raw.safetensors"), str(root / "ckpt")]
    worker = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield worker, root
    if worker.poll() is None:
        worker.terminate()
        worker.communicate(timeout=60)


@pytest.fixture(scope="module")
def vit():
    model = tiny_model("vit")
    adapter = get_adapter(model)
    batches = token_batches()
    return model, adapter, batches, capture_token_grams(model, adapter, batches)


@pytest.fixture(scope="module")
def uninterrupted(vit):
    return reference_token_losses(*vit, temperature=4.0)


def done_of(path: Path) -> torch.Tensor:
    with safe_open(str(path), "pt") as f:
        return f.get_tensor("token.done")


def test_a_killed_run_resumes_without_rerunning_finished_candidates(tmp_path, monkeypatch, vit, uninterrupted):
    run = token_losses._run
    calls: list[int] = []

    def failing_run(*args):
        if len(calls) == 11:
            raise RuntimeError("injected failure")
        calls.append(1)
        return run(*args)

    monkeypatch.setattr(token_losses, "_run", failing_run)
    with pytest.raises(RuntimeError, match="injected failure"):
        reference_token_losses(*vit, temperature=4.0, checkpoint_dir=tmp_path)
    assert int(done_of(tmp_path / "token_losses.process0.safetensors").sum()) == 11

    calls.clear()
    monkeypatch.setattr(token_losses, "_run", lambda *args: calls.append(1) or run(*args))
    resumed = reference_token_losses(*vit, temperature=4.0, checkpoint_dir=tmp_path)
    assert len(calls) == CANDIDATES - 11  # only the candidates the first run had not finished
    assert torch.equal(resumed.md, uninterrupted.md) and torch.equal(resumed.kl, uninterrupted.kl)
    calls.clear()
    assert torch.equal(reference_token_losses(*vit, temperature=4.0, checkpoint_dir=tmp_path).md, uninterrupted.md)
    assert not calls  # a finished checkpoint reruns nothing


def test_checkpoint_of_another_token_run_is_refused(tmp_path, vit):
    model, adapter, batches, capture = vit
    reference_token_losses(*vit, temperature=4.0, checkpoint_dir=tmp_path)
    with pytest.raises(ValueError, match="temperature: 4.0 there, 2.0 now"):
        reference_token_losses(*vit, temperature=2.0, checkpoint_dir=tmp_path)
    other = token_batches()[::-1]
    with pytest.raises(ValueError, match="calibration data"):
        reference_token_losses(model, adapter, other, capture_token_grams(model, adapter, other), 4.0, checkpoint_dir=tmp_path)


def test_token_and_head_neuron_checkpoints_share_a_folder(tmp_path, vit, uninterrupted):
    model, adapter, batches, _ = vit
    config = OptinConfig(md_tokens=40, checkpoint_dir=str(tmp_path), prune_neurons=False)
    heads = compute_raw_losses(model, adapter, batches, config, {"head": 4})
    tokens = reference_token_losses(*vit, temperature=4.0, checkpoint_dir=tmp_path)
    assert torch.equal(tokens.md, uninterrupted.md)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["raw_losses.process0.safetensors", "token_losses.process0.safetensors"]
    assert torch.equal(compute_raw_losses(model, adapter, batches, config, {"head": 4})["head"].md, heads["head"].md)


def test_two_processes_give_the_same_losses_as_one(two_process_run, uninterrupted, vit):
    worker, root = two_process_run
    _, stderr = worker.communicate(timeout=240)
    assert worker.returncode == 0, stderr[-3000:]
    assert "OPTIN tokens (2 processes)" in stderr
    with safe_open(str(root / "raw.safetensors"), "pt") as f:
        assert torch.allclose(f.get_tensor("md"), uninterrupted.md, rtol=1e-6, atol=0)
        assert torch.allclose(f.get_tensor("kl"), uninterrupted.kl, rtol=1e-6, atol=0)
    # each process ran its own half: disjoint shares that together cover every candidate
    shares = [done_of(root / "ckpt" / f"token_losses.process{i}.safetensors") for i in range(2)]
    assert int(shares[0].sum()) == int(shares[1].sum()) == CANDIDATES // 2
    assert not (shares[0] & shares[1]).any() and int((shares[0] | shares[1]).sum()) == CANDIDATES
