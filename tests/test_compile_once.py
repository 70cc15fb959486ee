"""Compile once: max_new_tokens buckets share one program, and a second process reads it from disk."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

import qspec_jax
from qspec_jax.cache import KVCache
from qspec_jax.decoding import DecodeConfig, generate

IDS = [[5, 6, 7, 8, 9, 10, 11], [3, 4, 12], [40, 41, 42, 43, 44, 45, 46, 47, 48, 49, 50]]
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def engine():
    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


def _static_reference(engine, mode, max_new, gamma=3):
    """What the engine computed before bucketing: max_new_tokens static, capacity to fit it."""
    dc = DecodeConfig(
        mode=mode,
        max_new_tokens=max_new,
        eos_ids=tuple(engine.config.eos_token_ids),
        gamma=gamma if mode == "qspec" else 0,
    )
    b = 4  # the engine's batch bucket for 3 prompts
    rows = IDS + [IDS[0]]
    toks = np.zeros((b, 16), np.int32)
    for i, t in enumerate(rows):
        toks[i, : len(t)] = t
    lens = np.asarray([len(t) for t in rows], np.int32)
    cap = -(-(16 + max_new + dc.tokens_per_step) // 64) * 64
    st = generate(
        engine.params,
        KVCache.init(engine.config, b, cap),
        toks,
        lens,
        jax.random.PRNGKey(0),
        cfg=engine.config,
        qcfg=engine.qconfig,
        dc=dc,
    )
    return [np.asarray(st.out_tokens[i, : st.num_generated[i]]).tolist() for i in range(3)]


@pytest.mark.parametrize("mode", ["w4a16", "qspec"])
def test_new_max_new_tokens_in_the_same_bucket_does_not_recompile(engine, mode):
    """20 and 30 new tokens share the 32 bucket: one program, the second call compiles nothing,
    and the first 20 of its 30 tokens are the 20 of the first call."""
    first = engine.generate(IDS, mode=mode, max_new_tokens=20, ignore_eos=True)
    n = engine.num_compiled
    assert first.stats["max_new_tokens_bucket"] == 32
    second = engine.generate(IDS, mode=mode, max_new_tokens=30, ignore_eos=True)
    assert engine.num_compiled == n
    assert second.stats["compile_source"] == "memory" and second.stats["compile_s"] == 0.0
    assert {len(t) for t in first.tokens} == {20}
    assert {len(t) for t in second.tokens} == {30}
    assert [t[:20] for t in second.tokens] == first.tokens
    again = engine.generate(IDS, mode=mode, max_new_tokens=20, ignore_eos=True)
    assert again.tokens == first.tokens and engine.num_compiled == n
    # A limit past the bucket is a new (larger) program.
    engine.generate(IDS, mode=mode, max_new_tokens=33, ignore_eos=True)
    assert engine.num_compiled == n + 1


@pytest.mark.parametrize("mode", ["w4a16", "qspec"])
def test_dynamic_limit_gives_the_static_limit_tokens(engine, mode):
    """Tokens equal those of the former program (static limit, cache sized to it), EOS on."""
    for max_new in (9, 20):
        got = engine.generate(IDS, mode=mode, max_new_tokens=max_new).tokens
        assert got == _static_reference(engine, mode, max_new)
        if mode == "qspec":
            assert got == engine.generate(IDS, mode="w4a16", max_new_tokens=max_new).tokens


_CHILD = """
import json, qspec_jax
e = qspec_jax.load("tiny")
r = e.generate([[5, 6, 7]], mode="fp", max_new_tokens=8)
print(json.dumps(dict(source=r.stats["compile_source"], compile_s=r.stats["compile_s"],
                      trace=r.stats["program_trace"], dir=e.compile_cache_dir, tokens=r.tokens)))
"""


def _child(env):
    out = subprocess.run(
        [sys.executable, "-c", _CHILD],
        cwd=REPO,
        env=env,
        check=True,
        capture_output=True,
        text=True,
        timeout=300,
    ).stdout
    return json.loads(out.strip().splitlines()[-1])


def test_second_process_reads_the_program_from_the_persistent_cache(tmp_path):
    env = dict(os.environ, QSPEC_JAX_CACHE_DIR=str(tmp_path / "root"))
    env.pop("QSPEC_JAX_COMPILE_CACHE", None)
    env.pop("QSPEC_JAX_EXPORT_CACHE", None)
    cold = _child(env)
    assert cold["source"] == "compiled" and cold["trace"] == "exported-written"
    assert cold["dir"] == str(tmp_path / "root" / "jax-cache") and os.listdir(cold["dir"])
    assert len(os.listdir(tmp_path / "root" / "exported")) == 1
    # the second process neither traces (the exported program) nor compiles (the XLA cache)
    warm = _child(env)
    assert warm["source"] == "disk" and warm["trace"] == "exported-read"
    assert warm["tokens"] == cold["tokens"]
    off = _child(
        dict(env, QSPEC_JAX_CACHE_DIR=str(tmp_path / "other"), QSPEC_JAX_COMPILE_CACHE="0")
    )
    assert off["source"] == "compiled" and off["dir"] is None and off["tokens"] == cold["tokens"]
    assert off["trace"] == "traced"
    assert not (tmp_path / "other").exists()
