"""The road through a prune job: which optin_hf modules a job passes through, and how often control
climbs back up to a higher-level module.

Traced, not read: every Python call made while the job runs is recorded (`sys.setprofile`), and each
call from a function of one optin_hf module into a function of another is one step of the road.
A step "climbs up" when the module it enters depends on the module it leaves (imports it, directly or
through others, counting imports inside functions, as tests/test_imports.py does): control then
flows against the import graph, through a callback or an object handed down. Two roads, on a tiny
BERT fine-tuned on synthetic sentences (tests/tiny_task.py):
- `prune_model`: `OptinPruner.prune_model` then `OptinPruner.save`;
- `run_prune`: the CLI's job from its entry to the saved checkpoint and report.
tests/test_imports.py runs the first and asserts that it never climbs.

    python benchmarks/job_road.py
"""

from __future__ import annotations

import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "tests")]

from test_imports import PACKAGE, import_graph  # noqa: E402
from tiny_task import sentences, tokenizer, trained_text_model, write_csv  # noqa: E402


def depends_on(graph: dict[str, set[str]]) -> dict[str, set[str]]:
    """module -> every module it imports, directly or through others."""
    closure: dict[str, set[str]] = {}

    def reach(name: str) -> set[str]:
        if name not in closure:
            closure[name] = set()
            for dep in graph[name]:
                closure[name] |= {dep} | reach(dep)
        return closure[name]

    for name in graph:
        reach(name)
    return closure


def trace(run: Callable[[], object]) -> list[tuple[str, str]]:
    """The (caller module, callee module) of every call between two optin_hf modules while `run()` runs."""
    steps: list[tuple[str, str]] = []

    def profile(frame, event, arg):
        if event != "call":
            return
        callee = frame.f_globals.get("__name__", "")
        caller = frame.f_back.f_globals.get("__name__", "") if frame.f_back else ""
        if callee.startswith("optin_hf") and caller.startswith("optin_hf") and callee != caller:
            steps.append((caller, callee))

    sys.setprofile(profile)
    try:
        run()
    finally:
        sys.setprofile(None)
    return steps


@dataclass
class Road:
    """The modules a traced run passed through, its calls between modules, and its climbs up
    ((caller, callee) -> count) and entries (module -> calls into it)."""

    modules: list[str]
    calls: int
    climbs: Counter
    entries: Counter


def road(run: Callable[[], object]) -> Road:
    """The road `run()` takes through optin_hf."""
    steps = trace(run)
    above = depends_on(import_graph(PACKAGE))
    return Road(
        sorted({m for step in steps for m in step}),
        len(steps),
        Counter(step for step in steps if step[0] in above.get(step[1], set())),
        Counter(callee for _, callee in steps),
    )


def short(module: str) -> str:
    return module.removeprefix("optin_hf.")


def report(name: str, found: Road) -> None:
    print(f"\n{name}: {len(found.modules)} modules, {found.calls} calls between modules, "
          f"{sum(found.climbs.values())} climbs up ({len(found.climbs)} distinct)")
    print("  modules: " + ", ".join(map(short, found.modules)))
    for (caller, callee), count in found.climbs.most_common():
        print(f"  climb: {short(caller)} -> {short(callee)} x{count}")
    print("  most entered: " + ", ".join(f"{short(m)} {n}" for m, n in found.entries.most_common(5)))


def prune_model_road(work: Path, **settings: object) -> Road:
    """`prune_model` then `save` of the tiny BERT classifier, written under the folder `work` (`settings`: more
    OptinConfig settings, e.g. importance="auto")."""
    from transformers import AutoModelForSequenceClassification

    from optin_hf import OptinConfig, OptinPruner

    if not (work / "model").is_dir():
        trained_text_model(work / "model")
    model = AutoModelForSequenceClassification.from_pretrained(work / "model")
    texts = [text for text, _ in sentences(32, 0)]
    pruner = OptinPruner(OptinConfig(mac_constraint=0.6, num_samples=16, reconstruct_samples=32, **settings))
    saved = work / ("slim-" + "-".join(f"{key}-{value}" for key, value in settings.items()) if settings else "slim")

    def prune_and_save() -> None:
        pruner.prune_model(model, texts, tokenizer=tokenizer())
        pruner.save(model, saved)

    return road(prune_and_save)


def run_prune_road(work: Path) -> Road:
    """The CLI's `prune` job on the tiny BERT classifier (saved under `work` by `prune_model_road`)."""
    from optin_hf.commands.__main__ import main as cli

    csv = write_csv(work / "data.csv")
    argv = ["prune", "--model", str(work / "model"), "--dataset", str(csv), "--mac-constraint", "0.6",
            "--num-samples", "16", "--reconstruct-samples", "32", "--output", str(work / "cli"),
            "--calibration-split", "train[:50%]", "--eval-split", "train[50%:]"]
    return road(lambda: cli(argv))


def main() -> None:
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        report('prune_model + save, importance="optin"', prune_model_road(work, importance="optin"))
        report('prune_model + save, importance="auto" (the default)', prune_model_road(work))
        report("run_prune (CLI)", run_prune_road(work))


if __name__ == "__main__":
    main()
