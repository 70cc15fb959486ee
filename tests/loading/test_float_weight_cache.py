"""A GGUF's float weights are cached like the int4 ones: the second load reads no GGUF.

The float mode dequantized the whole file on every load, which made its first call in a new
process the slowest of all modes (experiments/bench_first_call.py); on a tiny synthetic GGUF.
"""

import jax
import numpy as np
import pytest


def test_second_float_load_reads_the_checkpoint_not_the_gguf(tmp_path, monkeypatch, tiny_gguf):
    import qspec_jax
    import qspec_jax.engine
    import qspec_jax.loading
    from qspec_jax import disk_cache

    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(disk_cache.ENV_QUANT, raising=False)
    # the tiny file holds no tokenizer (load() refuses such a file); ids are passed directly
    monkeypatch.setattr(qspec_jax.engine, "_tokenizer", lambda source, use_cache: None)
    path = tiny_gguf.write(tmp_path / "tiny.gguf", tiny_gguf.weights(seed=2))
    first = qspec_jax.load(path, progress=False)
    assert first.load_info["quant_cache"] == "written" and first.weight_kinds == {"float"}

    def no_read(*a, **k):
        raise AssertionError("the GGUF file was read despite a cached checkpoint")

    monkeypatch.setattr(qspec_jax.loading, "load_checkpoint", no_read)
    second = qspec_jax.load(path, progress=False)
    assert second.load_info["quant_cache"] == "hit"
    assert second.qconfig == first.qconfig and second.config == first.config
    la, lb = (jax.tree_util.tree_leaves(e.params) for e in (first, second))
    assert len(la) == len(lb)
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
    # switched off: the file is read again (and fails here, proving the cache was skipped)
    monkeypatch.setenv(disk_cache.ENV_QUANT, "0")
    with pytest.raises(AssertionError, match="GGUF file was read"):
        qspec_jax.load(path, progress=False)


def test_bfloat16_first_and_cached_loads_agree(tmp_path, monkeypatch, tiny_gguf):
    """bfloat16 with the file's int4 codes: the Q8_0 head is in the first load and in the cached
    one, and the two hold the same pytree of the same arrays (so the same programs give the
    same tokens; greedy QSpec == W4A16 in bfloat16 is tests/test_bfloat16.py's)."""
    import qspec_jax
    import qspec_jax.engine
    from qspec_jax import disk_cache

    monkeypatch.setenv(disk_cache.ENV_DIR, str(tmp_path / "cache"))
    monkeypatch.delenv(disk_cache.ENV_QUANT, raising=False)
    monkeypatch.setattr(qspec_jax.engine, "_tokenizer", lambda source, use_cache: None)
    path = tiny_gguf.write(tmp_path / "tiny.gguf", tiny_gguf.weights(seed=4))
    first = qspec_jax.load(path, quant="gguf", dtype="bfloat16", progress=False)
    second = qspec_jax.load(path, quant="gguf", dtype="bfloat16", progress=False)
    assert (first.load_info["quant_cache"], second.load_info["quant_cache"]) == ("written", "hit")
    assert first.params.head_q8 is not None and second.params.head_q8 is not None
    (la, ta), (lb, tb) = (jax.tree_util.tree_flatten(e.params) for e in (first, second))
    assert ta == tb
    for x, y in zip(la, lb):
        assert x.dtype == y.dtype
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
