"""Memory and speed knobs through the CLI: kernels that need CUDA are refused before the run starts."""

from __future__ import annotations

import pytest

from tests.support.helpers import make_recipe, run_cli


@pytest.mark.parametrize(
    "override, key",
    [
        ("model.attn_implementation=flash_attention_2", "model.attn_implementation"),
        ("perf.kernels=liger", "perf.kernels"),
    ],
)
def test_kernels_that_cannot_run_here_are_refused_up_front(tmp_path, tiny_data, override, key):
    recipe = make_recipe(tmp_path, tiny_data)
    code, out, err = run_cli("train", str(recipe), "--set", override)
    assert code == 2 and out == ""
    assert err.startswith(f"error: {key}:") and "CUDA" in err
    assert not (tmp_path / "runs").exists()
