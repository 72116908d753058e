import io
import os
import pickle
from collections import OrderedDict

import pytest
import torch
from tiny import tiny_model

from optin_hf import ImportanceScores

L, H, I, T = 3, 4, 48, 17  # the tiny ViT: layers, heads, intermediate size, tokens


def expected_scores(seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    tokens = torch.rand(L, T, generator=g, dtype=torch.float64)
    tokens[0], tokens[:, 0] = 0, 0  # never candidates: not in the files
    return torch.rand(L, H, generator=g, dtype=torch.float64), torch.rand(L, I, generator=g, dtype=torch.float64), tokens


def reference_lists(score=lambda value: torch.tensor(-value, dtype=torch.float32)) -> tuple[list, list]:
    """The reference's format: (negated loss, layer, index, kind) sorted ascending; token p is neuron I + p."""
    heads, neurons, tokens = expected_scores()
    head_list = [(heads[l, h].item(), l, h, "head") for l in range(L) for h in range(H)]
    neuron_list = [(neurons[l, n].item(), l, n, "neuron") for l in range(L) for n in range(I)]
    neuron_list += [(tokens[l, p].item(), l, I + p, "neuron") for l in range(1, L) for p in range(1, T)]
    return [[(score(v), *rest) for v, *rest in sorted(entries, reverse=True)] for entries in (head_list, neuron_list)]


def write(path, obj) -> str:
    with open(path, "wb") as f:
        pickle.dump(obj, f)
    return str(path)


def check_imported(scores: ImportanceScores) -> None:
    heads, neurons, tokens = expected_scores()
    # The files hold float32 scores, so the imported float64 ones match to float32 precision.
    assert torch.allclose(scores.head_scores, heads, rtol=1e-6)
    assert torch.allclose(scores.neuron_scores, neurons, rtol=1e-6)
    assert torch.allclose(scores.token_scores, tokens, rtol=1e-6)
    assert scores.head_scores.flatten().argmax() == heads.flatten().argmax()  # higher = more important


def test_reference_pickles_import_to_the_scores_they_encode(tmp_path):
    head_list, neuron_list = reference_lists()
    assert head_list[0][0] == min(e[0] for e in head_list)  # ascending negated losses: the most important first
    config = tiny_model("vit").config
    scores = ImportanceScores.from_reference_rankings(
        write(tmp_path / "head_ranking_body.pkl", head_list), write(tmp_path / "neuron_ranking_body.pkl", neuron_list), config
    )
    check_imported(scores)
    scores.save(tmp_path / "scores.safetensors")
    assert torch.equal(ImportanceScores.load(tmp_path / "scores.safetensors").token_scores, scores.token_scores)


class CudaStorage:
    """Pickles like a CUDA tensor's storage (written by torch on a GPU machine): the legacy blob says 'cuda:0'."""

    def __init__(self, value: float):
        buffer = io.BytesIO()
        torch.save(torch.tensor([value])._typed_storage(), buffer, _use_new_zipfile_serialization=False)
        self.blob = buffer.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")
        assert b"cuda:0" in self.blob

    def __reduce__(self):
        return torch.storage._load_from_bytes, (self.blob,)


class CudaScalar:
    def __init__(self, value: float):
        self.storage = CudaStorage(value)

    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (self.storage, 0, (), (), False, OrderedDict())


def test_gpu_written_pickles_load_on_cpu(tmp_path):
    head_list, neuron_list = reference_lists(score=lambda value: CudaScalar(-value))
    head_pkl, neuron_pkl = write(tmp_path / "h.pkl", head_list), write(tmp_path / "n.pkl", neuron_list)
    with pytest.raises(RuntimeError, match="CUDA"):
        with open(head_pkl, "rb") as f:
            pickle.load(f)  # what a plain unpickler does on a machine without a GPU
    check_imported(ImportanceScores.from_reference_rankings(head_pkl, neuron_pkl, tiny_model("vit").config))


@pytest.mark.parametrize("zip_format", [True, False])
def test_torch_save_files_load_too(tmp_path, zip_format):
    head_list, neuron_list = reference_lists()
    torch.save(head_list, tmp_path / "h.pt", _use_new_zipfile_serialization=zip_format)
    torch.save(neuron_list, tmp_path / "n.pt", _use_new_zipfile_serialization=zip_format)
    check_imported(ImportanceScores.from_reference_rankings(tmp_path / "h.pt", tmp_path / "n.pt", tiny_model("vit").config))


class RunsCode:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_pickle_that_would_run_code_is_refused(tmp_path):
    head_list, neuron_list = reference_lists()
    marker = tmp_path / "pwned"
    evil = write(tmp_path / "evil.pkl", [RunsCode(marker)] + head_list)
    with pytest.raises(ValueError, match=r"evil\.pkl: refusing the global (posix|os|nt)\.system .*nothing of the file was run"):
        ImportanceScores.from_reference_rankings(evil, write(tmp_path / "n.pkl", neuron_list), tiny_model("vit").config)
    assert not marker.exists()


def test_a_truncated_rankings_file_is_named(tmp_path):
    head_list, neuron_list = reference_lists()
    data = pickle.dumps(head_list)
    (tmp_path / "head.pkl").write_bytes(data[: len(data) // 2])
    with pytest.raises(ValueError, match=r"head\.pkl is empty or cut short: not a complete rankings pickle"):
        ImportanceScores.from_reference_rankings(tmp_path / "head.pkl", write(tmp_path / "n.pkl", neuron_list), tiny_model("vit").config)


@pytest.mark.parametrize(
    ("entry", "problem"),
    [(("x", 0, 0, "head"), "entry of numbers"), ((torch.tensor([1.0, 2.0]), 0, 0, "head"), "holds 2"), ((1.0, 0, 0, "tok"), "is not a")],
)
def test_an_entry_that_is_not_a_score_is_named(tmp_path, entry, problem):
    head_list, neuron_list = reference_lists()
    bad = write(tmp_path / "bad.pkl", [entry] + head_list)
    with pytest.raises(ValueError, match=rf"bad\.pkl: .*{problem}"):
        ImportanceScores.from_reference_rankings(bad, write(tmp_path / "n.pkl", neuron_list), tiny_model("vit").config)


def test_rankings_for_another_model_are_refused(tmp_path):
    head_list, neuron_list = reference_lists()
    head_pkl, neuron_pkl = write(tmp_path / "h.pkl", head_list), write(tmp_path / "n.pkl", neuron_list)
    with pytest.raises(ValueError, match="miss 4 of the model's 12 heads"):
        ImportanceScores.from_reference_rankings(write(tmp_path / "short.pkl", head_list[4:]), neuron_pkl, tiny_model("vit").config)
    with pytest.raises(ValueError, match="outside this model"):
        ImportanceScores.from_reference_rankings(head_pkl, neuron_pkl, tiny_model("bert").config)
