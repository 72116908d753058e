"""No module of optin_hf imports a pickle library or calls torch.load: a file from elsewhere (weights, rankings)
is read as safetensors, JSON or, for the reference's rankings, by `importance.pickled_data`, which runs nothing."""

import ast
from pathlib import Path

import optin_hf

PICKLE_MODULES = {"pickle", "_pickle", "cPickle", "pickletools", "dill", "cloudpickle", "joblib"}
LOADERS = {"torch.load", "torch.serialization.load", "torch.storage._load_from_bytes", "torch.jit.load"}


def dotted(node: ast.expr, aliases: dict[str, str]) -> str:
    """`a.b.c` for an attribute chain, its root resolved through the file's `import x as y` aliases."""
    parts = []
    while isinstance(node, ast.Attribute):
        parts.append(node.attr)
        node = node.value
    if not isinstance(node, ast.Name):
        return ""
    return ".".join([aliases.get(node.id, node.id), *reversed(parts)])


def unpickling_in(source: str) -> list[str]:
    """What in `source` imports a pickle library or names a loader that unpickles (with its line)."""
    tree = ast.parse(source)
    aliases = {a.asname: a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names if a.asname}
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names if a.name.split(".")[0] in PICKLE_MODULES]
        elif isinstance(node, ast.ImportFrom):
            module = node.module or ""
            names = [f"{module}.{a.name}" for a in node.names if module.split(".")[0] in PICKLE_MODULES or f"{module}.{a.name}" in LOADERS]
        elif isinstance(node, ast.Attribute):
            names = [name] if (name := dotted(node, aliases)) in LOADERS else []
        elif isinstance(node, ast.keyword):  # numpy.load(..., allow_pickle=True)
            names = ["allow_pickle=True"] if node.arg == "allow_pickle" and getattr(node.value, "value", False) is True else []
        else:
            continue
        found += [(node.lineno, name) for name in names]
    return [f"line {line}: {name}" for line, name in sorted(found)]


def test_the_check_finds_every_form() -> None:
    source = (
        "import pickle\nfrom pickle import loads\nimport torch as t\nimport torch.serialization\n"
        "t.load('x')\ntorch.serialization.load('x')\nfrom torch import load\nnp.load('x', allow_pickle=True)\n"
        "import json, torch\ntorch.save(1, 'x')\nload = 1\n"
    )
    assert [hit.split(": ")[1] for hit in unpickling_in(source)] == [
        "pickle", "pickle.loads", "torch.load", "torch.serialization.load", "torch.load", "allow_pickle=True"
    ]


def test_no_module_of_optin_hf_unpickles() -> None:
    package = Path(optin_hf.__file__).parent
    modules = sorted(package.rglob("*.py"))
    assert len(modules) > 50
    found = {str(p.relative_to(package)): hits for p in modules if (hits := unpickling_in(p.read_text()))}
    assert not found, f"optin_hf must never unpickle a file (read it as data: importance/pickled_data.py): {found}"
