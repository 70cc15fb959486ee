"""A separate draft model (`load(target, draft_model=...)`, mode "draftmodel").

Greedy output equals the target's W4A16 autoregressive output token for token (no tolerance:
every committed token is the verifier's argmax given verified K/V; the draft model only
proposes). A random draft model is rejected almost always (rollback on nearly every step); the
target's own layers as a draft ("self:L" on a 2-layer target) are accepted always (the path in
which the draft cache misses the last draft's K/V and the next step writes them).
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import qspec_jax
from qspec_jax import DraftModelSpec, HSpec
from qspec_jax.config import preset
from qspec_jax.model.llama import forward
from qspec_jax.model.params import WithDraftModel, init_params

PROMPTS = [[5, 6, 7], [9, 10, 11, 12, 13, 14, 15], [20]]
# a smaller model with the target's vocabulary: 1 layer, half the width
SMALL = preset("tiny").replace(
    name="tiny-draft", hidden_size=64, intermediate_size=128, num_layers=1, num_heads=2,
    num_kv_heads=1,
)  # fmt: skip


def _load(draft_model):
    return qspec_jax.load(
        "tiny", quant="rtn", group_size=32, progress=False, draft_model=draft_model
    )


@pytest.fixture(scope="module")
def small():
    return _load((init_params(SMALL, jax.random.PRNGKey(7)), SMALL))


@pytest.fixture(scope="module")
def selfdraft():
    return _load("self:2")  # all of the tiny target's layers: the draft's argmax is the target's


@pytest.fixture(scope="module")
def ref(small):
    return small.generate(PROMPTS, "w4a16", max_new_tokens=14)


def test_small_draft_model_mixed_batch_equals_w4a16_ar(small, ref):
    got = small.generate(PROMPTS, DraftModelSpec(gamma=3), max_new_tokens=14)
    assert got.tokens == ref.tokens and got.finish_reasons == ref.finish_reasons
    assert got.stats["draft"] == "draft model"
    assert 0 <= got.stats["acceptance_rate"] < 0.5  # random draft: rollback nearly every step
    one = small.generate(PROMPTS[1:2], mode="draftmodel", gamma=3, max_new_tokens=14)
    assert one.tokens == ref.tokens[1:2]


def test_self_draft_accepts_everything_and_equals_ar(selfdraft, ref):
    # same random target (seed 0) in both fixtures, so the same reference
    got = selfdraft.generate(PROMPTS, DraftModelSpec(gamma=3), max_new_tokens=14)
    assert got.tokens == ref.tokens
    # Exactly 1: the int4 kernels compute a row the same whatever the rows beside it, so the
    # draft's argmax is the verifier's; anything lower means a draft K/V went missing.
    assert got.stats["acceptance_rate"] == 1.0


def test_self_draft_shares_the_target_arrays(selfdraft):
    p = selfdraft.params
    assert isinstance(p, WithDraftModel) and p.draft_cfg.num_layers == 2
    assert p.draft.layers[0].wqkv is p.target.layers[0].wqkv  # per-layer arrays: not copied
    assert p.draft.embed is p.target.embed
    assert selfdraft.weight_bytes_by_set["draft_model"] == 0


def test_hier_cache_with_continuous_batching(small):
    hier = dict(kv_cache="hier", kv_residual=16, max_new_tokens=14)
    ref = small.generate(PROMPTS, "w4a16", **hier)
    # continuous batching: rows refilled in place, each prefilled into both caches
    many = small.generate_many(PROMPTS, mode="draftmodel", gamma=2, batch_size=2, **hier)
    assert many.tokens == ref.tokens


def test_top_k_1_sampling_equals_greedy(small, ref):
    # temperature 1 with top_k 1 draws the argmax: speculative sampling must give greedy's tokens
    got = small.generate(
        PROMPTS, DraftModelSpec(gamma=3), max_new_tokens=14, temperature=1.0, top_k=1, seed=3
    )
    assert got.tokens == ref.tokens


def test_draft_cache_rolled_back_in_step_with_the_target(small):
    """After generation the draft cache holds the draft model's K/V of every committed token
    (prompt + generated, but the last) at its position, as a fresh draft prefill computes them."""
    from qspec_jax.cache.kv_cache import KVCache
    from qspec_jax.cache.protocol import make_cache
    from qspec_jax.decoding.loop import generate

    params, cfg = small.params, small.config
    m = DraftModelSpec(gamma=3)
    dc = small.decode_config(m, 16)
    prompt = [9, 10, 11, 12, 13, 14, 15]
    toks = jnp.asarray([prompt + [0] * 9], jnp.int32)
    cache = m.wrap_cache(make_cache("float", cfg, 1, 64), params)
    st = generate(
        params, cache, toks, jnp.asarray([7], jnp.int32), jax.random.PRNGKey(0),
        cfg=cfg, qcfg=small.qconfig, dc=dc,
    )  # fmt: skip
    n = int(st.num_generated[0])
    length = int(st.cache.lengths[0])
    assert length == 7 + n - 1 and int(st.cache.draft.lengths[0]) == length
    seq = prompt + np.asarray(st.out_tokens[0, :n]).tolist()
    assert int(st.cache.prev_token[0]) == seq[length - 1]
    fresh = KVCache.init(params.draft_cfg, 1, 64)
    _, fresh = forward(
        params.draft, jnp.asarray([seq[:length]], jnp.int32), fresh, params.draft_cfg,
        params.draft_qcfg, params.draft_precision,
    )  # fmt: skip
    # positions 0 .. length - 2 (the last committed position's K/V are written by the next
    # step's first draft forward). float32 K/V of the same model on the same tokens, computed
    # with different row counts: 1e-5 absolute covers matmul reassociation at |K| ~ 1.
    got_k = np.asarray(st.cache.draft.k[:, 0, : length - 1])
    want_k = np.asarray(fresh.k[:, 0, : length - 1])
    np.testing.assert_allclose(got_k, want_k, atol=1e-5)
    np.testing.assert_allclose(
        np.asarray(st.cache.draft.v[:, 0, : length - 1]),
        np.asarray(fresh.v[:, 0, : length - 1]),
        atol=1e-5,
    )


def test_bad_draft_models_refused_in_one_sentence():
    other = preset("tiny").replace(vocab_size=128)
    with pytest.raises(qspec_jax.UsageError, match="vocabulary of 128 tokens but the target"):
        _load((init_params(other, jax.random.PRNGKey(1)), other))
    with pytest.raises(qspec_jax.UsageError, match=r"1\.\.2"):
        _load("self:5")
    plain = qspec_jax.load("tiny", quant="rtn", group_size=32, progress=False)
    with pytest.raises(qspec_jax.UsageError, match="needs a draft model"):
        plain.generate(PROMPTS, mode="draftmodel")
    assert "draftmodel" not in plain.modes
    with pytest.raises(qspec_jax.UsageError, match="spec_max_active does not apply"):
        plain.generate(PROMPTS, mode="draftmodel", spec_max_active=2)


def test_draft_model_as_hspec_level_is_not_built():
    with pytest.raises(NotImplementedError, match="draftmodel"):
        HSpec(levels=("model", "w4a8", "w4a16"))
