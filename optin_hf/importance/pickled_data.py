"""Reading pickled data (lists, tuples, dicts, numbers, strings, bytes and torch tensors) with neither
`pickle` nor `torch.load`: a small interpreter of the pickle opcodes that can build only those values.

Why not a restricted unpickler: it still hands the file to pickle's (or torch.load's) machinery,
which imports and calls what the file names, and is only as safe as its allow-list is complete.
Here a global (GLOBAL, STACK_GLOBAL) is only its name, never imported, and a name outside this
module's short list is refused where it appears. The only calls
(REDUCE) are the steps of a pickled tensor, which this module performs itself on data it has
checked:

- `torch._utils._rebuild_tensor_v2(storage, offset, size, stride, requires_grad, OrderedDict())`,
- `torch.storage._load_from_bytes(blob)`: a storage as a whole `torch.save` file (legacy format,
  or zip),
- `collections.OrderedDict()`: the tensor's (empty) backward hooks,
- `_codecs.encode(text, "latin1")`: how pickle protocols 0-2 write bytes.

Storages come from the persistent ids `('storage', torch.<Type>Storage, key, location, numel)` of
a `torch.save` file: in a zip archive, the bytes of its `data/<key>` entry; in the legacy format,
the raw bytes after its pickles. They land on the CPU whatever location the file names, so a file
written from CUDA tensors reads on a machine with no GPU. Any other opcode, global, call or
persistent id raises `ValueError` naming the file and what was refused; nothing of it is run.
"""

from __future__ import annotations

import io
import os
import reprlib
import struct
import zipfile
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import torch

_ZIP = b"PK\x03\x04"  # how a zip archive (a torch.save file since torch 1.6) starts
_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C  # the first pickle of a legacy `torch.save` file
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": torch.float32,
    "DoubleStorage": torch.float64,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
    "UntypedStorage": torch.uint8,
}
_NOTHING_RUN = (
    "Pickled data is read here only as lists, numbers, strings, bytes and tensors, and nothing of the file was "
    "run. Do not open it with pickle or torch.load; get the file again from its source"
)


class CutShort(ValueError):
    """The data ends inside a pickle (an empty or truncated file)."""


class Refused(ValueError):
    """The data holds something that is not plain data or a tensor (code to run, a broken pickle)."""


@dataclass(frozen=True)
class Global:
    """A name a pickle refers to (GLOBAL, STACK_GLOBAL): kept as text, never imported."""

    module: str
    name: str

    def __str__(self) -> str:
        return f"{self.module}.{self.name}"


@dataclass(frozen=True)
class Storage:
    """A tensor storage read from a `torch.save` file: its elements, flat, on the CPU."""

    flat: torch.Tensor


def load_pickled_data(path: str | os.PathLike) -> Any:
    """The data in `path`: a `pickle.dump` file, a `torch.save` zip archive or a legacy `torch.save` file."""
    with open(path, "rb") as f:
        return read_pickled_data(f.read(), str(path))


def read_pickled_data(data: bytes, source: str) -> Any:
    """The data pickled in `data` (any of `load_pickled_data`'s formats); `source` names it in errors."""
    if data[:4] == _ZIP:
        return _read_zip(data, source)
    reader = _Reader(data, source, _PLAIN_CALLS)
    value = reader.load()
    return _read_legacy(data, reader.pos, source) if _is_legacy_magic(value) else value


def _is_legacy_magic(value: Any) -> bool:
    """Whether `value`, a file's first pickle, is the number a legacy `torch.save` file starts with."""
    return type(value) is int and value == _LEGACY_MAGIC


def _rebuild_tensor(reader: "_Reader", args: tuple) -> torch.Tensor:
    """`torch._utils._rebuild_tensor_v2`: a view of a storage, on data checked to lie inside it."""
    if not (len(args) in (6, 7) and isinstance(args[0], Storage)):
        reader.refuse("a tensor is rebuilt from (storage, offset, size, stride, requires_grad, hooks[, metadata])")
    storage, offset, size, stride, requires_grad, hooks, *metadata = args
    dims = (size, stride) if type(size) is type(stride) is tuple and len(size) == len(stride) else None
    if not (dims and all(type(n) is int and n >= 0 for n in (offset, *size, *stride)) and type(requires_grad) is bool):
        reader.refuse(f"a tensor with offset {offset!r}, size {size!r} and stride {stride!r}")
    if type(hooks) is not dict or hooks or any(m is not None and (type(m) is not dict or m) for m in metadata):
        reader.refuse("a tensor that carries backward hooks or metadata")
    if all(size) and offset + sum((n - 1) * s for n, s in zip(size, stride)) >= storage.flat.numel():
        reader.refuse(f"a tensor of size {size} reaching past its storage of {storage.flat.numel()} elements")
    return storage.flat.as_strided(size, stride, offset)


def _storage_from_bytes(reader: "_Reader", args: tuple) -> Storage:
    """`torch.storage._load_from_bytes`: the blob is a whole `torch.save` file of one storage, read by this module
    (only as a torch.save file, whose pickle cannot name `_load_from_bytes` again: no blob within a blob)."""
    if not (len(args) == 1 and type(args[0]) is bytes):
        reader.refuse("a tensor storage that is not given as bytes")
    blob, source = args[0], f"{reader.source} (a tensor's storage)"
    if blob[:4] == _ZIP:
        storage = _read_zip(blob, source)
    else:
        header = _Reader(blob, source, {})
        storage = _read_legacy(blob, header.pos, source) if _is_legacy_magic(header.load()) else None
    if not isinstance(storage, Storage):
        reader.refuse("a tensor storage that is not a torch.save file of one storage")
    return storage


def _empty_hooks(reader: "_Reader", args: tuple) -> dict:
    """`collections.OrderedDict()`, as a tensor's backward hooks: only the empty one is data."""
    if args != ():
        reader.refuse("an OrderedDict built from arguments")
    return {}


def _latin1_bytes(reader: "_Reader", args: tuple) -> bytes:
    """`_codecs.encode(text, "latin1")`: bytes as pickle protocols 0-2 write them."""
    if not (len(args) == 2 and type(args[0]) is str and args[1] == "latin1"):
        reader.refuse("_codecs.encode with arguments other than (text, 'latin1')")
    return args[0].encode("latin-1")


_Call = Callable[["_Reader", tuple], Any]
_STORAGE_TYPES = {Global("torch", name) for name in _STORAGE_DTYPES}  # named only in a torch.save file's storage ids
_TENSOR_CALLS: dict[Global, _Call] = {
    Global("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    Global("collections", "OrderedDict"): _empty_hooks,
    Global("_codecs", "encode"): _latin1_bytes,
}
# A plain pickle's tensors carry their storages as bytes; a torch.save file's come from persistent ids.
_PLAIN_CALLS = {**_TENSOR_CALLS, Global("torch.storage", "_load_from_bytes"): _storage_from_bytes}


class _Reader:
    """Runs the opcodes of one pickle at a time from `data`, building only plain values and tensors.

    `calls`: the globals this pickle may name, each with the function that performs it; `storage`: what a
    persistent id (a torch.save storage) becomes, or None where a pickle may hold none."""

    def __init__(
        self, data: bytes, source: str, calls: dict[Global, _Call], storage: Callable | None = None, pos: int = 0
    ):
        self.data, self.source, self.calls, self.storage, self.pos, self.at = data, source, calls, storage, pos, pos
        self.names = calls.keys() | _STORAGE_TYPES if storage else calls.keys()

    def refuse(self, what: str) -> NoReturn:
        raise Refused(f"{self.source}: refusing {what} (byte {self.at}). {_NOTHING_RUN}.")

    def read(self, n: int) -> bytes:
        start, self.pos = self.pos, self.pos + n
        if self.pos > len(self.data):
            raise CutShort(f"{self.source} is empty or cut short: it ends inside a pickle.")
        return self.data[start : self.pos]

    def line(self) -> bytes:
        end = self.data.find(b"\n", self.pos)
        return self.read((end if end >= 0 else len(self.data)) + 1 - self.pos)[:-1]

    def uint(self, n: int) -> int:
        return int.from_bytes(self.read(n), "little")

    def load(self) -> Any:
        """The value of the pickle that starts at `pos`; `pos` is left just past its STOP."""
        self.stack: list = []
        self.marks: list[list] = []
        self.memo: dict[int, Any] = {}
        self.at, op = self.pos, b""
        try:
            while (op := self.read(1)) != b".":  # STOP
                step = _OPCODES.get(op)
                if step is None:
                    self.refuse(f"the pickle opcode {_NAMES.get(op, op)}, which plain data does not use")
                step(self)
                self.at = self.pos
        except (CutShort, Refused):
            raise
        except (IndexError, KeyError, TypeError, ValueError, OverflowError, RuntimeError) as err:
            self.refuse(f"a malformed pickle ({_NAMES.get(op, op)}: {type(err).__name__}: {err})")
        if len(self.stack) != 1 or self.marks:
            self.refuse("a pickle whose stack does not end with one value")
        return self.stack[0]

    def pop_mark(self) -> list:
        items, self.stack = self.stack, self.marks.pop()
        return items

    def into(self, kind: type, items: list) -> None:
        """Add `items` (values, or alternate keys and values) to the list or dict on top of the stack."""
        target = self.stack[-1]
        if type(target) is not kind:
            self.refuse(f"adding items to a {type(target).__name__}, which is not a {kind.__name__}")
        if kind is list:
            target.extend(items)
        else:
            target.update(zip(items[::2], items[1::2]))

    def global_name(self, module: Any, name: Any) -> Global:
        if type(module) is not str or type(name) is not str:
            self.refuse("a global whose name is not text")
        found = Global(module, name)
        if found not in self.names:
            self.refuse(f"the global {found}")
        return found

    def reduce(self) -> None:
        args, func = self.stack.pop(), self.stack[-1]
        if not (type(func) is Global and func in self.calls and type(args) is tuple):
            self.refuse(f"a call of {func if type(func) is Global else 'a ' + type(func).__name__}")
        self.stack[-1] = self.calls[func](self, args)

    def persistent_id(self) -> None:
        if self.storage is None:
            self.refuse("a persistent id, which only a torch.save file's storages use")
        self.stack.append(self.storage(self, self.stack.pop()))

    def proto(self) -> None:
        if self.uint(1) > 5:
            self.refuse("a pickle protocol above 5")

    def mark(self) -> None:
        self.marks.append(self.stack)
        self.stack = []

    def pop(self) -> None:
        if self.stack:
            self.stack.pop()
        else:
            self.pop_mark()

    def tuple_of(self, n: int) -> None:
        if len(self.stack) < n:
            self.refuse(f"a tuple of {n} values from a stack of {len(self.stack)}")
        self.stack[len(self.stack) - n :] = [tuple(self.stack[len(self.stack) - n :])]

    def put(self, key: int) -> None:
        if key < 0:
            self.refuse(f"the memo slot {key}")
        self.memo[key] = self.stack[-1]

    def text_int(self) -> int | bool:
        digits = self.line()
        return False if digits == b"00" else True if digits == b"01" else int(digits)

    def dict_from_mark(self) -> None:
        items = self.pop_mark()
        self.stack.append({})
        self.into(dict, items)

    def setitem(self) -> None:
        value = self.stack.pop()
        self.into(dict, [self.stack.pop(), value])

    def stack_global(self) -> None:
        name = self.stack.pop()
        self.stack[-1] = self.global_name(self.stack[-1], name)


def _push(value: Callable[[_Reader], Any]) -> Callable[[_Reader], None]:
    def step(reader: _Reader) -> None:
        made = value(reader)  # first: LIST and TUPLE swap `reader.stack` back to the one below their mark
        reader.stack.append(made)

    return step


def _text(raw: bytes) -> str:
    return raw.decode("utf-8", "surrogatepass")


# The opcodes of plain data, pickle protocols 0-5 (pickletools documents each).
_OPCODES: dict[bytes, Callable[[_Reader], None]] = {
    b"\x80": _Reader.proto,  # PROTO
    b"\x95": lambda r: r.read(8),  # FRAME: a buffering hint; the frame's opcodes follow in place
    b"(": _Reader.mark,  # MARK
    b"0": _Reader.pop,  # POP
    b"1": _Reader.pop_mark,  # POP_MARK
    b"2": lambda r: r.stack.append(r.stack[-1]),  # DUP
    b"N": _push(lambda r: None),  # NONE
    b"\x88": _push(lambda r: True),  # NEWTRUE
    b"\x89": _push(lambda r: False),  # NEWFALSE
    b"I": _push(_Reader.text_int),  # INT
    b"J": _push(lambda r: int.from_bytes(r.read(4), "little", signed=True)),  # BININT
    b"K": _push(lambda r: r.uint(1)),  # BININT1
    b"M": _push(lambda r: r.uint(2)),  # BININT2
    b"L": _push(lambda r: int(r.line().removesuffix(b"L"))),  # LONG
    b"\x8a": _push(lambda r: int.from_bytes(r.read(r.uint(1)), "little", signed=True)),  # LONG1
    b"\x8b": _push(lambda r: int.from_bytes(r.read(r.uint(4)), "little", signed=True)),  # LONG4
    b"F": _push(lambda r: float(r.line())),  # FLOAT
    b"G": _push(lambda r: struct.unpack(">d", r.read(8))[0]),  # BINFLOAT
    b"V": _push(lambda r: r.line().decode("raw-unicode-escape")),  # UNICODE
    b"X": _push(lambda r: _text(r.read(r.uint(4)))),  # BINUNICODE
    b"\x8c": _push(lambda r: _text(r.read(r.uint(1)))),  # SHORT_BINUNICODE
    b"\x8d": _push(lambda r: _text(r.read(r.uint(8)))),  # BINUNICODE8
    b"B": _push(lambda r: r.read(r.uint(4))),  # BINBYTES
    b"C": _push(lambda r: r.read(r.uint(1))),  # SHORT_BINBYTES
    b"\x8e": _push(lambda r: r.read(r.uint(8))),  # BINBYTES8
    b"]": _push(lambda r: []),  # EMPTY_LIST
    b"l": _push(_Reader.pop_mark),  # LIST
    b"a": lambda r: r.into(list, [r.stack.pop()]),  # APPEND
    b"e": lambda r: r.into(list, r.pop_mark()),  # APPENDS
    b")": _push(lambda r: ()),  # EMPTY_TUPLE
    b"t": _push(lambda r: tuple(r.pop_mark())),  # TUPLE
    b"\x85": lambda r: r.tuple_of(1),  # TUPLE1
    b"\x86": lambda r: r.tuple_of(2),  # TUPLE2
    b"\x87": lambda r: r.tuple_of(3),  # TUPLE3
    b"}": _push(lambda r: {}),  # EMPTY_DICT
    b"d": _Reader.dict_from_mark,  # DICT
    b"s": _Reader.setitem,  # SETITEM
    b"u": lambda r: r.into(dict, r.pop_mark()),  # SETITEMS
    b"g": lambda r: r.stack.append(r.memo[int(r.line())]),  # GET
    b"h": lambda r: r.stack.append(r.memo[r.uint(1)]),  # BINGET
    b"j": lambda r: r.stack.append(r.memo[r.uint(4)]),  # LONG_BINGET
    b"p": lambda r: r.put(int(r.line())),  # PUT
    b"q": lambda r: r.put(r.uint(1)),  # BINPUT
    b"r": lambda r: r.put(r.uint(4)),  # LONG_BINPUT
    b"\x94": lambda r: r.put(len(r.memo)),  # MEMOIZE
    b"c": lambda r: r.stack.append(r.global_name(_text(r.line()), _text(r.line()))),  # GLOBAL: a name, not an import
    b"\x93": _Reader.stack_global,  # STACK_GLOBAL: likewise
    b"R": _Reader.reduce,  # REDUCE: only the calls a tensor's pickle makes
    b"Q": _Reader.persistent_id,  # BINPERSID: a torch.save storage
}
# Names of the opcodes refused (pickletools documents them): most create or change objects by calling code.
_NAMES = {
    b"i": "INST", b"o": "OBJ", b"\x81": "NEWOBJ", b"\x92": "NEWOBJ_EX", b"b": "BUILD", b"P": "PERSID",
    b"\x82": "EXT1", b"\x83": "EXT2", b"\x84": "EXT4", b"S": "STRING", b"T": "BINSTRING", b"U": "SHORT_BINSTRING",
    b"\x8f": "EMPTY_SET", b"\x90": "ADDITEMS", b"\x91": "FROZENSET", b"\x96": "BYTEARRAY8", b"\x97": "NEXT_BUFFER",
    b"\x98": "READONLY_BUFFER",
}


def _storage_kind(reader: _Reader, pid: Any) -> tuple[str, torch.dtype, int]:
    """(key, dtype, numel) of a torch.save persistent id ('storage', type, key, location, numel[, None]); the
    location (where the tensor lived: "cpu", "cuda:0") is not used: everything is read onto the CPU."""
    if not (type(pid) is tuple and len(pid) in (5, 6) and pid[0] == "storage" and pid[5:] in ((), (None,))):
        reader.refuse(f"the persistent id {reprlib.repr(pid)}")
    _, kind, key, location, numel = pid[:5]
    if not (type(kind) is Global and kind.module == "torch" and kind.name in _STORAGE_DTYPES):
        reader.refuse(f"a storage of type {kind}")
    if not (type(key) is str and type(location) is str and type(numel) is int and numel >= 0):
        reader.refuse(f"the storage id {reprlib.repr(pid)}")
    return key, _STORAGE_DTYPES[kind.name], numel


def _flat(raw: bytes, dtype: torch.dtype) -> torch.Tensor:
    """The elements in `raw`, copied (a tensor of its own, writable)."""
    return torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype)


def _read_zip(data: bytes, source: str) -> Any:
    """A `torch.save` zip archive: `<name>/data.pkl` with storages in `<name>/data/<key>`."""
    try:
        archive = zipfile.ZipFile(io.BytesIO(data))
        names = set(archive.namelist())
        pickles = [name for name in names if name.count("/") == 1 and name.endswith("/data.pkl")]
        if len(pickles) != 1:
            raise Refused(f"{source} is a zip archive but not a torch.save file: it has no single <name>/data.pkl.")
        prefix = pickles[0].removesuffix("data.pkl")
        if prefix + "byteorder" in names and archive.read(prefix + "byteorder") != b"little":
            raise Refused(f"{source} was written on a big-endian machine; save it again on a little-endian one.")
        storages: dict[str, Storage] = {}

        def storage(reader: _Reader, pid: Any) -> Storage:
            key, dtype, numel = _storage_kind(reader, pid)
            if key not in storages:
                entry = f"{prefix}data/{key}"
                raw = archive.read(entry) if entry in names else reader.refuse(f"a storage with no entry {entry}")
                if len(raw) != numel * dtype.itemsize:
                    reader.refuse(f"the storage {key}: {len(raw)} bytes for {numel} elements of {dtype}")
                storages[key] = Storage(_flat(raw, dtype))
            return storages[key]

        return _Reader(archive.read(pickles[0]), f"{source} ({pickles[0]})", _TENSOR_CALLS, storage).load()
    except (zipfile.BadZipFile, NotImplementedError, EOFError, OSError) as err:
        raise CutShort(f"{source} is empty or cut short: not a readable zip archive ({err}).") from err


def _read_legacy(data: bytes, pos: int, source: str) -> Any:
    """The rest of a legacy `torch.save` file from `pos`, after its magic number: protocol version, system info,
    the data pickle, the sorted storage keys, then each storage's element count (8 bytes, little-endian) and
    its bytes."""
    header = _Reader(data, source, {}, pos=pos)
    version, info = header.load(), header.load()
    if version != _LEGACY_PROTOCOL or type(info) is not dict or info.get("little_endian") is not True:
        header.refuse("a legacy torch.save file of another version or from a big-endian machine; save it again")
    storages: dict[str, Storage] = {}

    def storage(reader: _Reader, pid: Any) -> Storage:
        key, dtype, numel = _storage_kind(reader, pid)
        if key not in storages:
            if numel * dtype.itemsize > len(data) - reader.pos:  # its bytes come after this pickle
                raise CutShort(f"{source} is cut short: a storage of {numel} elements does not fit in it.")
            storages[key] = Storage(torch.empty(numel, dtype=dtype))  # filled below, once its bytes are reached
        return storages[key]

    main = _Reader(data, source, _TENSOR_CALLS, storage, pos=header.pos)
    value = main.load()
    tail = _Reader(data, source, {}, pos=main.pos)
    keys = tail.load()
    if not (type(keys) is list and all(type(key) is str for key in keys) and sorted(keys) == sorted(storages)):
        tail.refuse("storage keys that are not those the data names")
    for key in keys:
        flat = storages[key].flat
        if tail.uint(8) != flat.numel():
            tail.refuse(f"the storage {key}, whose element count differs from its id's")
        flat.view(torch.uint8).copy_(_flat(tail.read(flat.numel() * flat.itemsize), torch.uint8))
    return value
