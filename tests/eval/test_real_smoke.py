"""One tiny real-model run: 2 math problems, 32 new tokens, W4A16 and QSpec (pytest -m real)."""

from __future__ import annotations

import pytest

pytestmark = pytest.mark.real


def test_math_smoke_qspec_equals_w4a16(tmp_path):
    import qspec_jax
    from qspec_jax.eval import run_eval

    engine = qspec_jax.load("smollm2-135m", quant="quarot-rtn", progress=False)
    s = run_eval(engine, "math", ["w4a16", "qspec"], 2, max_new_tokens=32, gamma=3,
                 results_path=str(tmp_path / "smoke.json"), progress=False, batch_size=2)
    assert s["comparisons"]["qspec_equals_w4a16_tokens"] == 1.0
    for mode in ("w4a16", "qspec"):
        r = s["results"][mode]
        assert r["n_items"] == 2 and r["tokens_generated"] > 0 and r["tokens_per_s"] > 0
    assert 0.0 <= s["results"]["qspec"]["acceptance_rate"] <= 1.0
