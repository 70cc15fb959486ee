"""The functional API (`qspec_jax.generate`) inside a user's own `jax.jit`, and the method objects.

Each generation here is compared token for token with the engine's: the functional API runs the
same prefill / step functions, so any difference is a bug, not rounding (no tolerance).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qspec_jax
from qspec_jax import AR, HSpec, QSpec, QuantSpec
from qspec_jax.decoding.methods import MethodError, from_mode, mode_names, mode_table_markdown

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]


@pytest.fixture(scope="module")
def engine():
    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


def _padded(prompts, t=8):
    toks = np.zeros((len(prompts), t), np.int32)
    for i, p in enumerate(prompts):
        toks[i, : len(p)] = p
    return jnp.asarray(toks), jnp.asarray([len(p) for p in prompts], jnp.int32)


@pytest.mark.parametrize("method", [AR("w4a16"), QSpec(gamma=2)], ids=["ar", "qspec"])
def test_generate_inside_users_jit_equals_engine(engine, method):
    cfg, qcfg = engine.config, engine.qconfig

    @jax.jit
    def run(params, toks, lens, key):
        st = qspec_jax.generate(
            params, toks, lens, key, cfg=cfg, qcfg=qcfg, method=method, max_new_tokens=12
        )
        return st.out_tokens, st.num_generated

    toks, lens = _padded(PROMPTS)
    out, n = jax.device_get(run(engine.params, toks, lens, jax.random.PRNGKey(0)))
    got = [out[i, : n[i]].tolist() for i in range(len(PROMPTS))]
    ref = engine.generate(PROMPTS, method, max_new_tokens=12)
    assert got == ref.tokens


def test_method_objects_and_mode_strings_are_one_thing(engine):
    by_object = engine.generate(PROMPTS, QSpec(gamma=3, draft="w4a4"), max_new_tokens=10)
    by_mode = engine.generate(PROMPTS, mode="qspec", gamma=3, draft="w4a4", max_new_tokens=10)
    timing = ("wall_s", "tokens_per_s", "compile_s", "compile_source")
    assert by_object.tokens == by_mode.tokens
    assert {k: v for k, v in by_object.stats.items() if k not in timing} == {
        k: v for k, v in by_mode.stats.items() if k not in timing
    }
    assert by_mode.stats["compile_source"] == "memory"  # the same program: one compile
    with pytest.raises(qspec_jax.UsageError, match="go inside the method object"):
        engine.generate(PROMPTS, QSpec(), gamma=2)


def test_registry_names_every_mode_once():
    assert mode_names() == (
        "fp", "w4a16", "w4a4", "w4a8", "qspec", "quantspec", "hspec", "draftmodel"
    )  # fmt: skip
    assert from_mode("w4a8") == AR("w4a8") and from_mode("hspec") == HSpec()
    assert from_mode("quantspec", gamma=5) == QuantSpec(gamma=5)
    table = mode_table_markdown()
    assert all(f"`{m}`" in table for m in mode_names())
    with pytest.raises(MethodError, match="gamma must be an integer in 1..16"):
        QSpec(gamma=0)
    with pytest.raises(MethodError, match="unknown mode 'turbo'"):
        from_mode("turbo")


def test_readme_mode_table_is_the_registrys():
    import os

    readme = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md")
    with open(readme) as fh:
        assert mode_table_markdown() in fh.read(), "regenerate the README's mode table"
