"""QuantSpec and QSpec x QuantSpec on the tiny int4 model with the hierarchical KV cache: greedy
output equal to W4A16 autoregressive decoding on the same cache format, across buffer flushes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from qspec_jax.cache import HierKVCache, KVCache
from qspec_jax.decoding import DecodeConfig, generate
from qspec_jax.quant import quantize_model

MAX_NEW = 28


@pytest.fixture(scope="module")
def tiny_q(tiny_cfg, tiny_params):
    return quantize_model(tiny_params, tiny_cfg, "rtn", 32, progress=False)


def _run(cfg, tiny_q, toks, lens, dc, kv="hier", residual=4, cap=64):
    params, qcfg = tiny_q
    if kv == "hier":
        cache = HierKVCache.init(
            cfg, toks.shape[0], cap, residual=residual, step_tokens=dc.tokens_per_step
        )
    else:
        cache = KVCache.init(cfg, toks.shape[0], cap)
    return generate(params, cache, toks, lens, jax.random.PRNGKey(0), cfg=cfg, qcfg=qcfg, dc=dc)


def _prompts(lens, t=16, seed=3):
    toks = np.array(jax.random.randint(jax.random.PRNGKey(seed), (len(lens), t), 3, 250), np.int32)
    for i, n in enumerate(lens):
        toks[i, n:] = 0
    return jnp.asarray(toks), jnp.asarray(lens, jnp.int32)


def _tokens(s):
    return [
        np.asarray(s.out_tokens[b, : s.num_generated[b]]).tolist() for b in range(s.done.shape[0])
    ]


@pytest.mark.parametrize(
    "mode, gamma, residual",
    [("quantspec", 3, 4), ("quantspec", 5, 8), ("qspec", 3, 4), ("qspec", 4, 8)],
)
def test_greedy_speculative_hier_equals_w4a16_ar_hier_ragged_batch(
    tiny_cfg, tiny_q, mode, gamma, residual
):
    """Token-identical to W4A16 greedy on the hierarchical cache (same R), on a mixed-length batch
    and for a sequence alone. R = 4 or 8 with 28 new tokens: every sequence crosses several
    flushes, some inside a verify block. The drafts really are rejected sometimes."""
    toks, lens = _prompts([3, 16, 9, 12, 5, 7, 16, 1])
    ar = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW),
        residual=residual,
    )
    sp = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode=mode, max_new_tokens=MAX_NEW, gamma=gamma),
        residual=residual,
    )
    assert _tokens(sp) == _tokens(ar)
    assert (np.asarray(sp.cache.q_len) >= 3 * residual).all()  # flushed several times
    acc = np.asarray(sp.draft_accepted).sum() / np.asarray(sp.draft_proposed).sum()
    assert 0.0 < acc < 1.0, acc
    for b in (1, 7):  # batch 1: the same tokens alone
        alone = _run(
            tiny_cfg,
            tiny_q,
            toks[b : b + 1],
            lens[b : b + 1],
            DecodeConfig(mode=mode, max_new_tokens=MAX_NEW, gamma=gamma),
            residual=residual,
        )
        assert _tokens(alone)[0] == _tokens(ar)[b]


def test_quantspec_stops_on_eos_like_ar_hier(tiny_cfg, tiny_q):
    toks, lens = _prompts([5, 16, 9])
    free = _tokens(
        _run(tiny_cfg, tiny_q, toks, lens, DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW))
    )
    eos = (free[0][9], free[1][14])
    ar = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW, eos_ids=eos),
    )
    sp = _run(
        tiny_cfg,
        tiny_q,
        toks,
        lens,
        DecodeConfig(mode="quantspec", max_new_tokens=MAX_NEW, gamma=4, eos_ids=eos),
    )
    assert _tokens(sp) == _tokens(ar)
    np.testing.assert_array_equal(np.asarray(sp.finish), np.asarray(ar.finish))


def test_hier_cache_changes_w4a16_output_only_through_kv_precision(tiny_cfg, tiny_q):
    """With R larger than every sequence nothing is ever quantized: hier AR == float AR exactly
    is not required (different attention code), but the tokens agree; with R = 4 the int8 KV is
    in use (q_len > 0) and the run still completes every sequence."""
    toks, lens = _prompts([3, 16, 9])
    dc = DecodeConfig(mode="w4a16", max_new_tokens=MAX_NEW)
    flt = _tokens(_run(tiny_cfg, tiny_q, toks, lens, dc, kv="float"))
    big = _run(tiny_cfg, tiny_q, toks, lens, dc, residual=64, cap=64)
    assert int(np.asarray(big.cache.q_len).max()) == 0
    assert _tokens(big) == flt
    small = _run(tiny_cfg, tiny_q, toks, lens, dc, residual=4)
    assert int(np.asarray(small.cache.q_len).min()) > 0
    assert all(len(t) == MAX_NEW for t in _tokens(small))


@pytest.fixture(scope="module")
def tiny_engine():
    import qspec_jax

    return qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)


def test_engine_quantspec_and_kv_cache_option(tiny_engine):
    """The engine's kv_cache / kv_residual options and mode "quantspec": exact against W4A16 AR
    on the same cache, statistics reported (acceptance, KV bytes per token)."""
    prompts = [[5, 6, 7, 8, 9, 10, 11, 12, 13], [20, 21, 22]]
    kw = dict(max_new_tokens=20, ignore_eos=True, kv_residual=4)
    ar = tiny_engine.generate(prompts, mode="w4a16", kv_cache="hier", **kw)
    qs = tiny_engine.generate(prompts, mode="quantspec", gamma=3, **kw)  # hier by default
    mix = tiny_engine.generate(prompts, mode="qspec", gamma=3, kv_cache="hier", **kw)
    assert qs.tokens == ar.tokens == mix.tokens
    assert qs.stats["kv_cache"] == "hier" and 0 < qs.stats["acceptance_rate"] <= 1
    # the precision the drafts really run in: the verifier's for quantspec, the draft's for qspec
    assert qs.stats["draft"] == "w4a16" and mix.stats["draft"] == "w4a8"  # generate's default
    flt = tiny_engine.generate(prompts, mode="w4a16", **kw)
    assert flt.stats["kv_cache"] == "float"
    # tiny: 2 layers, 2 KV heads of 32 -> float32 512 B/token; int8 codes + scales much less,
    # but these short sequences still hold up to 2R tokens in the float buffer
    assert flt.stats["kv_bytes_per_token"] == 2 * 2 * 2 * 32 * 4
    assert ar.stats["kv_bytes_per_token"] < flt.stats["kv_bytes_per_token"]


def test_engine_rejects_bad_kv_options_in_one_sentence(tiny_engine):
    import qspec_jax

    with pytest.raises(qspec_jax.UsageError, match="unknown kv_cache 'int3'"):
        tiny_engine.generate([[5, 6]], mode="w4a16", kv_cache="int3")
    with pytest.raises(qspec_jax.UsageError, match="use kv_cache='hier'"):
        tiny_engine.generate([[5, 6]], mode="quantspec", kv_cache="float")
    with pytest.raises(qspec_jax.UsageError, match="larger than kv_residual"):
        tiny_engine.generate([[5, 6]], mode="quantspec", gamma=5, kv_residual=4)
    with pytest.raises(qspec_jax.UsageError, match="kv_residual must be a positive integer"):
        tiny_engine.generate([[5, 6]], mode="w4a16", kv_cache="hier", kv_residual=0)


@pytest.mark.parametrize(
    "argv, needle",
    [
        (["--kv-cache", "int3"], "invalid choice: 'int3'"),
        (["--mode", "quantspec", "--kv-cache", "float"], "use --kv-cache hier"),
        (["--kv-cache", "hier", "--kv-residual", "0"], "--kv-residual must be >= 1"),
    ],
)
def test_cli_rejects_bad_kv_options_exit_2(capsys, argv, needle):
    from qspec_jax.cli import main

    code = main(["generate", "--model", "tiny", "--prompt", "x", *argv])
    _, err = capsys.readouterr()
    assert code == 2 and needle in err and len(err.strip().splitlines()) == 1
