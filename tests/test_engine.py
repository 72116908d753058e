"""The fast engine gives the reference loop's scores, however the data is batched, the
candidates are split between processes, or the run is interrupted and resumed."""

from __future__ import annotations

import dataclasses
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from engine_worker import WORKER_CONFIG
from safetensors import safe_open
from scipy.stats import spearmanr
from tiny import calibration, tiny_model
from transformers import BertConfig, BertForNextSentencePrediction, DeiTConfig, DeiTForImageClassificationWithTeacher

from optin_hf import ImportanceScores, OptinConfig, OptinPruner
from optin_hf.arch import get_adapter
from optin_hf.capture import md_token_rows
from optin_hf.data import prepare_calibration
from optin_hf.engine.fast import SATURATING_TOKENS, FastRunner, auto_variants
from optin_hf.engine.prefix import bucket_by_length, split_points
from optin_hf.engine.reference import ReferenceRunner
from optin_hf.engine import compute_raw_losses
from optin_hf.importance.optin import neuron_energy_order
from optin_hf.engine.run import candidate_masks
from optin_hf.losses import balance

TESTS = Path(__file__).parent
TOTAL = 3 * (4 + 48)  # candidates of a tiny model: 3 layers of 4 heads and 48 neurons


def score(arch: str, data=None, model=None, **settings) -> ImportanceScores:
    config = OptinConfig(**{**WORKER_CONFIG, **settings})
    return OptinPruner(config).compute_scores(model or tiny_model(arch), calibration(arch) if data is None else data)


def assert_same_scores(got: ImportanceScores, want: ImportanceScores, rtol: float = 1e-4) -> None:
    for name in ("head_scores", "neuron_scores"):
        a, b = getattr(got, name), getattr(want, name)
        assert float(((a - b).abs() / b.abs()).max()) < rtol, name
        assert torch.equal(a.flatten().argsort(), b.flatten().argsort()), f"{name}: the ranking differs"


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", autouse=True)
def two_process_run(tmp_path_factory):
    """A 2-process CPU (gloo) run of the worker, started with the module so that its slow start
    (two interpreters importing torch) overlaps the in-process tests."""
    out = tmp_path_factory.mktemp("two-processes") / "scores.safetensors"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(TESTS / "engine_worker.py"), str(out)]
    worker = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    yield worker, out
    if worker.poll() is None:  # deselected or failed early; on SIGTERM the launcher stops its workers too
        worker.terminate()
        worker.communicate(timeout=60)


@pytest.fixture(scope="module")
def fast_bert() -> ImportanceScores:
    return score("bert")


def worker_env() -> dict[str, str]:
    """The worker imports optin_hf and tests/tiny.py; one thread each, the machine has few cores."""
    path = os.pathsep.join([str(TESTS.parent), str(TESTS), os.environ.get("PYTHONPATH", "")])
    return {**os.environ, "PYTHONPATH": path, "OMP_NUM_THREADS": "1"}


def done_count(checkpoint_dir: Path) -> int:
    files = list(checkpoint_dir.glob("raw_losses.*.safetensors"))
    if not files:
        return 0
    with safe_open(str(files[0]), "pt") as f:
        return int(f.get_tensor("head.done").sum() + f.get_tensor("neuron.done").sum())


@pytest.mark.parametrize("arch", ["bert", "vit"])
def test_fast_engine_matches_reference_loop(arch, fast_bert):
    fast = fast_bert if arch == "bert" else score(arch)
    assert_same_scores(fast, score(arch, engine="reference"))


def test_buckets_keep_the_md_tokens_and_cut_padding():
    lengths = [3, 17, 5, 16, 4, 9, 18, 6, 11, 2, 15, 7]
    # Every token id names its example and position, so the chosen tokens can be compared.
    examples = [{"input_ids": torch.arange(n) + 100 * e} for e, n in enumerate(lengths)]
    batches = prepare_calibration(examples, num_samples=12, batch_size=5, max_length=64)
    rows = md_token_rows(batches, 30, 0, None)
    buckets = bucket_by_length(batches, 5, 30, 0, None)
    chosen = lambda bs, rs: sorted(int(t) for b, r in zip(bs, rs) for t in b["input_ids"].flatten()[r])  # noqa: E731
    assert chosen(buckets.batches, buckets.rows) == chosen(batches, rows)
    assert all(b["attention_mask"].flatten()[r].all() for b, r in zip(buckets.batches, buckets.rows))
    padded = lambda bs: sum(int((b["attention_mask"] == 0).sum()) for b in bs)  # noqa: E731
    assert padded(buckets.batches) < padded(batches) / 2


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
@pytest.mark.parametrize("arch", ["bert", "roberta", "distilbert"])
def test_packed_forwards_give_the_reference_losses(arch, attn):
    """Text examples are packed end to end with a block-diagonal mask (in the float form eager
    attention takes and the bool form of sdpa), in fewer positions than length buckets, and every
    candidate's MD and KL stay the reference loop's. sdpa gets no mask for a batch without
    padding; that batch is packed all the same."""
    model = tiny_model(arch, attn=attn)
    adapter = get_adapter(model)
    g = torch.Generator().manual_seed(0)
    lengths = [3, 17, 5, 16, 4, 9, 18, 6, 11, 2, 15, 7] + [2] * 5  # the five 2s: a bucket without padding
    examples = [{"input_ids": torch.randint(5, 120, (n,), generator=g)} for n in lengths]
    batches = prepare_calibration(examples, num_samples=len(lengths), batch_size=5, max_length=64)
    config = OptinConfig(**WORKER_CONFIG)
    fast, reference = FastRunner(model, adapter, batches, config), ReferenceRunner(model, adapter, batches, config)
    assert all(first is not None for first in fast.first), "not packed"
    packed = sum(calls[0].hidden.shape[:2].numel() for calls in fast.calls)
    bucketed = sum(b["attention_mask"].numel() for b in bucket_by_length(batches, 5, 40, 0, None).batches)
    assert packed < bucketed
    for layer in range(3):
        for kind, masks in [("head", candidate_masks([0, 3], 4, 1)), ("neuron", candidate_masks([5, 40], 48, 1))]:
            got, want = torch.tensor(fast.run(kind, layer, masks)), torch.tensor(reference.run(kind, layer, masks))
            assert torch.allclose(got, want, rtol=1e-4, atol=0), (kind, layer)


def test_left_padded_text_is_bucketed_not_packed():
    model = tiny_model("bert")
    batches = prepare_calibration(calibration("bert"), num_samples=12, batch_size=12, max_length=64)
    left = [{k: v.flip(1) for k, v in batch.items()} for batch in batches]  # padding first; ids reversed too
    fast = FastRunner(model, get_adapter(model), left, OptinConfig(**WORKER_CONFIG))
    assert fast.first == [None] * len(fast.calls)
    reference = ReferenceRunner(model, get_adapter(model), left, OptinConfig(**WORKER_CONFIG))
    masks = candidate_masks([1, 2], 4, 1)
    assert torch.allclose(torch.tensor(fast.run("head", 0, masks)), torch.tensor(reference.run("head", 0, masks)), rtol=1e-4)


def test_split_points_are_the_cheapest_bucketing():
    """Padded rows + a fixed cost per bucket, minimised over every way to cut the sorted lengths."""
    import itertools
    import random

    def cost(lengths, ends, forward_cost):
        starts = [0, *ends[:-1]]
        return sum((b - a) * lengths[b - 1] + forward_cost for a, b in zip(starts, ends))

    rng = random.Random(0)
    for _ in range(30):
        lengths = sorted(rng.randint(1, 60) for _ in range(rng.randint(1, 9)))
        max_size, forward_cost = rng.randint(1, 5), rng.choice([0, 8, 64])
        n = len(lengths)
        cuts = (list(c) + [n] for r in range(n) for c in itertools.combinations(range(1, n), r))
        feasible = [e for e in cuts if all(b - a <= max_size for a, b in zip([0, *e[:-1]], e))]
        ends = split_points(lengths, max_size, forward_cost)
        assert ends in feasible
        assert cost(lengths, ends, forward_cost) == min(cost(lengths, e, forward_cost) for e in feasible)


def test_scores_do_not_depend_on_batching_padding_or_stacking(fast_bert):
    data = calibration("bert")
    padded = [{"input_ids": torch.nn.functional.pad(d["input_ids"], (0, 24 - len(d["input_ids"]))),
               "attention_mask": (torch.arange(24) < len(d["input_ids"])).long()} for d in data]
    assert_same_scores(score("bert", padded), fast_bert)
    assert_same_scores(score("bert", batch_size=12), fast_bert)
    assert_same_scores(score("bert", variants_per_batch=1), fast_bert)


def test_two_processes_give_the_same_scores_as_one(two_process_run, fast_bert):
    worker, out = two_process_run
    _, stderr = worker.communicate(timeout=240)
    assert worker.returncode == 0, stderr[-3000:]
    assert "OPTIN scoring (2 processes)" in stderr
    assert_same_scores(ImportanceScores.load(out), fast_bert, rtol=1e-6)


def test_run_interrupted_by_an_exception_resumes_and_matches(tmp_path, monkeypatch):
    run = FastRunner.run
    computed: list[int] = []

    def failing_run(self, kind, layer, unit_mask):
        if len(computed) >= 40:
            raise RuntimeError("injected failure")
        computed.extend(range(unit_mask.shape[0]))
        return run(self, kind, layer, unit_mask)

    monkeypatch.setattr(FastRunner, "run", failing_run)
    with pytest.raises(RuntimeError, match="injected failure"):
        score("bert", checkpoint_dir=tmp_path, variants_per_batch=7)
    assert done_count(tmp_path) == len(computed) and 0 < len(computed) < TOTAL

    before = len(computed)
    computed.clear()

    def counting_run(self, kind, layer, unit_mask):
        computed.extend(range(unit_mask.shape[0]))
        return run(self, kind, layer, unit_mask)

    monkeypatch.setattr(FastRunner, "run", counting_run)
    resumed = score("bert", checkpoint_dir=tmp_path, variants_per_batch=7)
    assert len(computed) == TOTAL - before  # only the candidates the first run had not finished
    uninterrupted = score("bert", variants_per_batch=7)
    assert torch.equal(resumed.head_scores, uninterrupted.head_scores)
    assert torch.equal(resumed.neuron_scores, uninterrupted.neuron_scores)


def test_run_killed_by_sigkill_resumes_and_matches(tmp_path):
    checkpoint_dir = tmp_path / "ckpt"
    cmd = [sys.executable, str(TESTS / "engine_worker.py"), str(tmp_path / "unused.safetensors"),
           "--checkpoint-dir", str(checkpoint_dir), "--variants", "2", "--delay", "0.2"]
    worker = subprocess.Popen(cmd, env=worker_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 180
        while done_count(checkpoint_dir) < 10:
            assert worker.poll() is None, worker.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the worker wrote no checkpoint in time"
            time.sleep(0.05)
        os.kill(worker.pid, signal.SIGKILL)
    finally:
        worker.kill()
        worker.wait()
        worker.stderr.close()
    assert worker.returncode == -signal.SIGKILL
    assert 10 <= done_count(checkpoint_dir) < TOTAL
    resumed = score("bert", checkpoint_dir=checkpoint_dir, variants_per_batch=2)
    assert done_count(checkpoint_dir) == TOTAL
    assert_same_scores(resumed, score("bert", variants_per_batch=2), rtol=1e-6)


def test_checkpoint_of_another_run_is_refused(tmp_path):
    score("bert", checkpoint_dir=tmp_path, prune_neurons=False)
    with pytest.raises(ValueError, match="calibration data"):
        score("bert", calibration("bert", seed=5), checkpoint_dir=tmp_path, prune_neurons=False)
    with pytest.raises(ValueError, match="model weights"):
        score("bert", model=tiny_model("bert", seed=1), checkpoint_dir=tmp_path, prune_neurons=False)
    with pytest.raises(ValueError, match="md_tokens: 40 there, 30 now"):
        score("bert", checkpoint_dir=tmp_path, prune_neurons=False, md_tokens=30)


def test_precision_options_are_validated_and_half_precision_runs(fast_bert):
    with pytest.raises(ValueError, match="dtype='int8' is unknown"):
        OptinConfig(dtype="int8")
    with pytest.raises(ValueError, match="variants_per_batch=0"):
        OptinConfig(variants_per_batch=0)
    half = score("bert", dtype="bfloat16")  # autocast; on CPU too, though it is meant for GPUs
    assert spearmanr(half.neuron_scores.flatten(), fast_bert.neuron_scores.flatten())[0] > 0.95


def test_every_adapter_reproduces_its_models_in_pieces():
    deit = DeiTConfig(
        image_size=16, patch_size=4, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=48
    )
    torch.manual_seed(0)
    extra = {"deit": DeiTForImageClassificationWithTeacher(deit).eval()}
    for arch in ["bert", "bert-encoder", "roberta", "distilbert", "vit", "deit"]:
        for model in [tiny_model(arch), extra.get(arch)]:
            if model is None:
                continue
            data = calibration(arch if arch != "bert-encoder" else "bert")
            batches = prepare_calibration(data, num_samples=12, batch_size=5, max_length=64)
            FastRunner(model, get_adapter(model), batches, OptinConfig(**WORKER_CONFIG))  # checks the replay


def test_an_adapter_that_does_not_reproduce_the_model_is_refused():
    model = tiny_model("bert")
    wrong = dataclasses.replace(get_adapter(model), feed_forward=lambda layer, hidden, *args, **kwargs: hidden)
    batches = prepare_calibration(calibration("bert"), num_samples=12, batch_size=5, max_length=64)
    with pytest.raises(RuntimeError, match="does not reproduce"):
        FastRunner(model, wrong, batches, OptinConfig(**WORKER_CONFIG))


def test_unknown_task_head_falls_back_to_reference_loop():
    torch.manual_seed(0)
    config = BertConfig(vocab_size=120, max_position_embeddings=64, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=48)
    model = BertForNextSentencePrediction(config).eval()
    with pytest.warns(UserWarning, match="uses the reference engine"):
        fast = score("bert", model=model, prune_neurons=False)
    reference = score("bert", model=model, prune_neurons=False, engine="reference")
    assert torch.equal(fast.head_scores, reference.head_scores)


def test_automatic_stack_size_respects_memory_and_saturation():
    cpu = torch.device("cpu")
    assert auto_variants(cpu, per_variant=1, tokens_per_variant=1024) == SATURATING_TOKENS["cpu"] // 1024
    assert auto_variants(cpu, per_variant=1 << 60, tokens_per_variant=1) == 1


def test_neuron_groups_score_each_group_removed_together():
    """Grouped neurons (of like output energy) share equally the score of removing their whole group, in both engines."""
    from optin_hf.arch import get_adapter
    from optin_hf.capture import capture_dense
    from optin_hf.engine.reference import masked_run_losses
    from optin_hf.hooks import apply_masks

    model, data = tiny_model("bert"), calibration("bert", n=6)
    config = OptinConfig(importance="optin", md_tokens=24, num_samples=6, batch_size=3, neuron_group_size=16, prune_heads=False,
                         faithful=False, mac_constraint=0.8)  # heads kept whole cost 0.62 of this tiny model
    fast = OptinPruner(config).compute_scores(model, data).neuron_scores
    ref = OptinPruner(OptinConfig(**{**config.to_dict(), "engine": "reference"})).compute_scores(model, data).neuron_scores
    assert torch.allclose(fast, ref, rtol=1e-4)
    adapter = get_adapter(model)
    batches = OptinPruner(config)._batches(model, adapter, data, None)
    order = neuron_energy_order(model, adapter, batches)  # groups are 16 neurons of like output energy
    assert torch.equal(order[0].sort().values, torch.arange(48)) and not torch.equal(order[0], torch.arange(48))
    assert torch.equal(fast[0, order[0, 0]], fast[0, order[0, 15]]) and not torch.equal(fast[0, order[0, 15]], fast[0, order[0, 16]])
    # By hand: the raw losses of removing each group of 16 of each layer together.
    capture = capture_dense(model, adapter, batches, config.md_tokens, config.seed)
    raw = torch.zeros(2, 3, 3, dtype=torch.float64)
    for layer in range(3):
        for g in range(3):
            mask = torch.ones(3, 48)
            mask[layer, order[layer, g * 16 : (g + 1) * 16]] = 0
            with apply_masks(model, adapter, neuron_mask=mask):
                raw[:, layer, g] = torch.tensor(masked_run_losses(model, adapter, batches, capture, layer, config.temperature))
    by_place = (balance(raw[0], raw[1], config.lambda_contribution) / 16).repeat_interleave(16, dim=1)
    expected = torch.empty_like(by_place).scatter_(1, order, by_place)
    assert torch.allclose(ref, expected, rtol=1e-6)


def test_a_last_partial_neuron_group_is_scored_and_shared_by_its_own_neurons():
    """48 neurons in groups of 20: 20 + 20 + 8; the 8 share their group's score 8 ways (and groups wider than
    the layer are one group); both engines agree."""
    model, data = tiny_model("bert"), calibration("bert", n=6)
    config = OptinConfig(importance="optin", md_tokens=24, num_samples=6, batch_size=3, neuron_group_size=20, prune_heads=False,
                         mac_constraint=0.8)
    fast = OptinPruner(config).compute_scores(model, data).neuron_scores
    ref = OptinPruner(OptinConfig(**{**config.to_dict(), "engine": "reference"})).compute_scores(model, data).neuron_scores
    assert fast.shape == (3, 48) and fast.is_contiguous() and torch.allclose(fast, ref, rtol=1e-4)
    pruner = OptinPruner(config)
    batches = pruner._batches(model, get_adapter(model), data, None)
    order = neuron_energy_order(model, get_adapter(model), batches)
    by_place = fast.gather(1, order)
    assert torch.equal(by_place[:, 40], by_place[:, 47]) and not torch.equal(by_place[:, 39], by_place[:, 40])
    raw = compute_raw_losses(model, get_adapter(model), batches, config, {"neuron": 3}, {"neuron": 20}, {"neuron": order})
    balanced = balance(raw["neuron"].md, raw["neuron"].kl, config.lambda_contribution)
    assert torch.allclose(by_place, (balanced / torch.tensor([20.0, 20.0, 8.0])).repeat_interleave(torch.tensor([20, 20, 8]), dim=1))
    wide = OptinPruner(OptinConfig(**{**config.to_dict(), "neuron_group_size": 64})).compute_scores(model, data)
    assert wide.neuron_scores.shape == (3, 48) and torch.equal(wide.neuron_scores[:, 0], wide.neuron_scores[:, 47])


@pytest.mark.parametrize("arch", ["bert", "distilbert", "vit"])
def test_neuron_runs_compute_their_layers_ffn_once_and_match_the_full_path(arch):
    """The up projection of a neuron's layer runs once per bucket, not once per variant; masks
    that change different numbers of units, or scale one by half, still match the tiled run."""
    model = tiny_model(arch)
    adapter = get_adapter(model)
    batches = prepare_calibration(calibration(arch), num_samples=12, batch_size=5, max_length=64)
    config = OptinConfig(**WORKER_CONFIG)
    shortcut = FastRunner(model, adapter, batches, config)
    no_shortcut = dataclasses.replace(  # a refit needs finish_feed_forward: the declaration drops the repairs with it
        adapter, finish_feed_forward=None,  # (and the refit's allocation, which needs one)
        capabilities=dataclasses.replace(adapter.capabilities, repairs=(), inputs=False, allocation="scores"),
    )
    full = FastRunner(model, no_shortcut, batches, config)
    masks = (torch.rand(5, 48, generator=torch.Generator().manual_seed(0)) > 0.2).float()
    masks[0, 3] = 0.5
    for layer, module in enumerate(shortcut.layers):
        rows: list[int] = []
        up = module.get_submodule(adapter.ffn_up).register_forward_hook(lambda m, args, out: rows.append(len(out)))
        got = shortcut.run("neuron", layer, masks)
        up.remove()
        assert rows == [calls[layer].hidden.shape[0] for calls in shortcut.calls]
        for a, b in zip(torch.tensor(got), torch.tensor(full.run("neuron", layer, masks))):
            assert torch.allclose(a, b, rtol=1e-4, atol=0)
