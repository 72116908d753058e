"""The development split the digit-scenes SegFormer's pruning settings are chosen on (benchmarks/segformer_dev.py)
never shows a digit of the test split or of the model's training, and its calibration and evaluation halves
share none: settings are picked on handwriting that nothing else judges or trains on."""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
from segformer_dev import NAME, development_splits  # noqa: E402

from optin_hf.tasks.defaults.corpora import CORPORA
from optin_hf.tasks.defaults.registry import RECIPES


def test_development_scenes_use_only_their_own_half_of_the_calibration_digits():
    recipe = RECIPES[NAME]
    pools = {name: set(pool) for name, pool in CORPORA[recipe.corpus](**recipe.corpus_options).pools(recipe.split).items()}
    calibration, evaluation = development_splits(calibration_scenes=16, evaluation_scenes=16)
    used = [{d for scene in split["digit_ids"] for d in scene} for split in (calibration, evaluation)]
    assert all(used) and not used[0] & used[1]
    for digits in used:
        assert digits <= pools["calibration"] and not digits & (pools["test"] | pools["train"])
    assert len(calibration) == len(evaluation) == 16
