"""`importance.pickled_data` reads what pickle.dump and torch.save (zip and legacy) write, values and tensors
exactly, and refuses every pickle that would run code, without running it (each exploit below is first shown to
work under pickle itself)."""

import io
import os
import pickle
import warnings
import zipfile
from collections import OrderedDict
from pathlib import Path

import pytest
import torch

from optin_hf.importance.pickled_data import CutShort, Refused, load_pickled_data, read_pickled_data


def values() -> list:
    grid = torch.arange(12, dtype=torch.bfloat16).reshape(3, 4)
    shared = torch.tensor([0.5, -0.25], dtype=torch.float16)
    return [
        (torch.tensor(-1.5), 0, 3, "head"),
        (torch.tensor(2.25, dtype=torch.float64), 1, 0, "neuron"),
        grid[:, 1::2],  # a strided view: offset 1, stride (4, 2) into a 12-element storage
        torch.tensor([True, False]),
        torch.arange(3, dtype=torch.int64) - 1,
        torch.tensor([1 + 2j], dtype=torch.complex64),
        shared,
        shared[1:],  # the same storage again
        {"a": [1, 2**70, -(2**40)], "ü€\n": (None, True, False, 1.5, -0.0, "text", b"by\x00tes\xff")},
        [],
        (),
        "",
    ]


def same(a, b) -> bool:
    if isinstance(a, torch.Tensor):
        return type(b) is torch.Tensor and a.dtype == b.dtype and a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict):
        return type(b) is dict and list(a) == list(b) and all(same(a[k], b[k]) for k in a)
    return type(a) is type(b) and a == b and str(a) == str(b)  # str: -0.0 stays -0.0


WRITERS = {
    **{f"pickle protocol {p}": lambda obj, path, p=p: path.write_bytes(pickle.dumps(obj, protocol=p)) for p in range(6)},
    "torch.save": lambda obj, path: torch.save(obj, path),
    "torch.save legacy": lambda obj, path: torch.save(obj, path, _use_new_zipfile_serialization=False),
}


@pytest.mark.parametrize("writer", WRITERS)
def test_what_pickle_and_torch_save_write_reads_back_exactly(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "data"
    WRITERS[writer](values(), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's warning on a tensor over a read-only buffer
        read = load_pickled_data(path)
    assert same(values(), read), read
    read[6][0] = 9  # each tensor owns a writable copy of the file's bytes
    assert read[6][0] == 9


def test_a_storage_written_from_cuda_reads_on_the_cpu() -> None:
    buffer = io.BytesIO()
    torch.save(torch.tensor([3.5, -1.0])._typed_storage(), buffer, _use_new_zipfile_serialization=False)
    blob = buffer.getvalue().replace(b"X\x03\x00\x00\x00cpu", b"X\x06\x00\x00\x00cuda:0")  # as a GPU machine writes it
    assert b"cuda:0" in blob
    assert torch.equal(read_pickled_data(blob, "blob").flat, torch.tensor([3.5, -1.0]))


@pytest.mark.parametrize("writer", ["pickle protocol 2", "pickle protocol 4", "torch.save legacy"])
def test_every_truncation_is_cut_short(tmp_path: Path, writer: str) -> None:
    path = tmp_path / "data"
    WRITERS[writer]([(torch.tensor(-1.5), 0, 3, "head"), {"k": 2**70}], path)
    data = path.read_bytes()
    for end in range(len(data)):
        with pytest.raises(CutShort, match="cut short"):
            read_pickled_data(data[:end], "data")


def test_a_truncated_zip_archive_is_cut_short(tmp_path: Path) -> None:
    torch.save([torch.tensor(-1.5)], tmp_path / "data.pt")
    data = (tmp_path / "data.pt").read_bytes()
    for end in range(4, len(data), 97):
        with pytest.raises(CutShort, match="cut short"):
            read_pickled_data(data[:end], "data.pt")


def short_text(text: str) -> bytes:
    raw = text.encode()
    return b"\x8c" + bytes([len(raw)]) + raw


# Pickles that run code when unpickled: each writes `marker`. (bytes, what the refusal names)
EXPLOITS = {
    "GLOBAL os.system + REDUCE": lambda marker: (f"cos\nsystem\n(Vtouch {marker}\ntR.".encode(), r"the global os\.system"),
    "STACK_GLOBAL builtins.eval": lambda marker: (
        b"\x80\x04" + short_text("builtins") + short_text("eval") + b"\x93"
        + short_text(f"open({str(marker)!r}, 'w').close()") + b"\x85R.",
        r"the global builtins\.eval",
    ),
    "INST": lambda marker: (f"(Vtouch {marker}\nios\nsystem\n.".encode(), "the pickle opcode INST"),
    "OBJ": lambda marker: (f"(cos\nsystem\nVtouch {marker}\no.".encode(), r"the global os\.system"),
    "NEWOBJ of an allowed name": lambda marker: (
        b"\x80\x02ccollections\nOrderedDict\n)\x81" + f"cos\nsystem\n(Vtouch {marker}\ntR.".encode(),
        "the pickle opcode NEWOBJ",
    ),
}


@pytest.mark.parametrize("exploit", EXPLOITS)
def test_a_pickle_that_runs_code_is_refused_and_nothing_runs(tmp_path: Path, exploit: str) -> None:
    proof = tmp_path / "proof"
    pickle.loads(EXPLOITS[exploit](proof)[0])
    assert proof.exists()  # the exploit is real: pickle runs it

    marker = tmp_path / "pwned"
    data, refusal = EXPLOITS[exploit](marker)
    (tmp_path / "evil.pkl").write_bytes(data)
    with pytest.raises(Refused, match=rf"evil\.pkl: refusing {refusal}.*nothing of the file was run"):
        load_pickled_data(tmp_path / "evil.pkl")
    assert not marker.exists()


def test_a_torch_save_archive_whose_data_calls_code_is_refused(tmp_path: Path) -> None:
    torch.save([(torch.tensor(-1.5), 0, 3, "head")], tmp_path / "good.pt")
    evil_pickle = lambda marker: b"\x80\x02" + f"(cos\nsystem\n(Vtouch {marker}\ntRl.".encode()  # noqa: E731
    pickle.loads(evil_pickle(tmp_path / "proof"))
    assert (tmp_path / "proof").exists()
    marker = tmp_path / "pwned"
    with zipfile.ZipFile(tmp_path / "good.pt") as good, zipfile.ZipFile(tmp_path / "evil.pt", "w") as evil:
        for name in good.namelist():
            evil.writestr(name, evil_pickle(marker) if name.endswith("/data.pkl") else good.read(name))
    with pytest.raises(Refused, match=r"evil\.pt \(good/data\.pkl\): refusing the global os\.system"):
        load_pickled_data(tmp_path / "evil.pt")
    assert not marker.exists()


class RunsCode:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_code_hidden_in_a_tensor_storage_blob_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save(RunsCode(marker), buffer, _use_new_zipfile_serialization=False)  # torch's own _load_from_bytes runs it

    class Smuggled:
        def __reduce__(self):
            return torch.storage._load_from_bytes, (buffer.getvalue(),)

    with pytest.raises(Refused, match=r"\(a tensor's storage\): refusing the global (posix|os|nt)\.system"):
        read_pickled_data(pickle.dumps([Smuggled()]), "evil.pkl")
    assert not marker.exists()


class PastItsStorage:
    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, (torch.tensor([1.0])._typed_storage(), 5, (3,), (1,), False, OrderedDict())


class BlobInABlob:
    def __reduce__(self):
        return torch.storage._load_from_bytes, (pickle.dumps([1.5]),)  # a plain pickle, not a torch.save file


class NotAStorage:
    def __reduce__(self):
        return torch._utils._rebuild_tensor_v2, ("storage", 0, (), (), False, OrderedDict())


@pytest.mark.parametrize(
    ("data", "refusal"),
    [
        (pickle.dumps([PastItsStorage()]), r"a tensor of size \(3,\) reaching past its storage of 1 elements"),
        (pickle.dumps(NotAStorage()), r"a tensor is rebuilt from \(storage"),
        (pickle.dumps(BlobInABlob()), "a tensor storage that is not a torch.save file of one storage"),
        (b"\x80\x02X\x01\x00\x00\x00xQ.", "a persistent id"),  # only a torch.save file's storages have one
        (b"\x80\x02]}b.", "the pickle opcode BUILD"),
        (b"\x80\x02ccollections\nOrderedDict\nK\x01\x85R.", "an OrderedDict built from arguments"),
        (b"\x80\x02ctorch\nFloatStorage\n.", r"the global torch\.FloatStorage"),  # a storage type, outside a torch file
        (b"\x80\x02K\x01\x85]R.", "a call of a tuple"),
        (b"\x80\x02K\x01K\x02.", "a pickle whose stack does not end with one value"),
    ],
)
def test_anything_but_plain_data_and_tensors_is_refused(data: bytes, refusal: str) -> None:
    with pytest.raises(Refused, match=rf"^f\.pkl: refusing {refusal}"):
        read_pickled_data(data, "f.pkl")
