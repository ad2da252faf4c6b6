"""The real-model presets are valid params files a GPU user can copy over params.yaml."""

from pathlib import Path

import pytest

from workflow.params import load_params, variants

PRESETS = sorted((Path(__file__).resolve().parents[1] / "presets").glob("*.yaml"))


def test_there_are_presets():
    assert PRESETS


@pytest.mark.parametrize("path", PRESETS, ids=lambda p: p.stem)
def test_preset_validates_and_expands(path):
    params = load_params(path)
    assert variants(params)
    for name in params.matrix.model:
        assert not params.models[name].source.startswith("builtin:")  # real models only
