"""`pallas_kernels.dispatch`: impl selection, NotImplementedError fallback, backend family."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from kernel_test_base import random_activation_codes, random_weight

from pallas_kernels import dispatch


@pytest.fixture
def auto_is_pallas(monkeypatch):
    """Pretend the default backend is a GPU, so impl=None picks "pallas"."""
    monkeypatch.setattr(dispatch, "default_impl", lambda: "pallas")


@pytest.fixture
def triton_backend():
    yield
    dispatch.set_gpu_backend("triton")


def test_auto_on_cpu_is_cpu_kernels_or_xla():
    from pallas_kernels import cpu_kernels

    assert jax.default_backend() == "cpu"
    assert dispatch.default_impl() == ("cpu" if cpu_kernels.available() else "xla")


def test_unknown_impl_raises():
    x = jnp.ones((1, 64))
    with pytest.raises(ValueError, match="unknown impl"):
        dispatch.hadamard_transform(x, impl="cuda")
    with pytest.raises(ValueError, match="unknown GPU backend"):
        dispatch.set_gpu_backend("cutlass")


def _unsupported_w4a16():
    # N = 40 has no power-of-two block >= 16 dividing it: the Pallas kernel refuses it.
    packed, scales, mins = random_weight(jax.random.key(1), 128, 40, 64, True)
    x = jax.random.normal(jax.random.key(2), (3, 128))
    return x, packed, scales, mins


def test_explicit_pallas_raises_not_implemented():
    x, packed, scales, mins = _unsupported_w4a16()
    for impl in ("pallas", "pallas_interpret"):
        with pytest.raises(NotImplementedError, match="N=40"):
            dispatch.w4a16_matmul(x, packed, scales, mins, impl=impl)


def test_auto_falls_back_to_xla(auto_is_pallas):
    x, packed, scales, mins = _unsupported_w4a16()
    y = dispatch.w4a16_matmul(x, packed, scales, mins)  # Pallas refuses -> XLA
    ref = dispatch.w4a16_matmul(x, packed, scales, mins, impl="xla")
    np.testing.assert_array_equal(np.asarray(y), np.asarray(ref))


def test_auto_falls_back_inside_jit(auto_is_pallas):
    x, packed, scales, mins = _unsupported_w4a16()
    f = jax.jit(lambda x: dispatch.w4a16_matmul(x, packed, scales, mins))
    ref = dispatch.w4a16_matmul(x, packed, scales, mins, impl="xla")
    # Inside an outer jit XLA may fold the constant weights differently: float rounding only.
    np.testing.assert_allclose(np.asarray(f(x)), np.asarray(ref), rtol=1e-5, atol=1e-6)


def test_mosaic_is_a_todo(auto_is_pallas, triton_backend):
    dispatch.set_gpu_backend("mosaic")
    assert dispatch.get_gpu_backend() == "mosaic"
    x = jax.random.normal(jax.random.key(3), (2, 576))
    with pytest.raises(NotImplementedError, match="Mosaic"):
        dispatch.hadamard_transform(x, impl="pallas")
    y = dispatch.hadamard_transform(x)  # auto: falls back to XLA
    np.testing.assert_array_equal(
        np.asarray(y), np.asarray(dispatch.hadamard_transform(x, impl="xla"))
    )


@pytest.mark.parametrize(
    "call",
    [
        # K = 96 is not a multiple of the 64-row pack tile.
        lambda impl: dispatch.w4a16_matmul(
            jnp.ones((1, 96)), jnp.zeros((48, 64), jnp.uint8), jnp.ones((3, 64)), impl=impl
        ),
        # Weight group size 48 is not a multiple of 32.
        lambda impl: dispatch.w4a16_matmul(
            jnp.ones((1, 192)), jnp.zeros((96, 64), jnp.uint8), jnp.ones((4, 64)), impl=impl
        ),
        # Activation group size 48.
        lambda impl: dispatch.w4ax_matmul(
            jnp.ones((1, 192), jnp.int8),
            jnp.ones((1, 4)),
            jnp.zeros((96, 64), jnp.uint8),
            jnp.ones((1, 64)),
            impl=impl,
        ),
        # Act-quant group of 16 columns.
        lambda impl: dispatch.quantize_activations(
            jnp.ones((2, 64)), bits=4, group_size=16, impl=impl
        ),
        # 3 bits.
        lambda impl: dispatch.quantize_activations(jnp.ones((2, 64)), bits=3, impl=impl),
        # Hadamard order 12 * 4: fewer than 16 Sylvester columns for the kernel's dots.
        lambda impl: dispatch.hadamard_transform(jnp.ones((2, 48)), impl=impl),
    ],
)
def test_unsupported_shapes_raise(call):
    with pytest.raises(NotImplementedError):
        call("pallas_interpret")


def test_block_sizes_must_divide():
    from pallas_kernels import w4a16_matmul, w4ax_matmul

    x, packed, scales, mins = _unsupported_w4a16()
    packed, scales, _ = random_weight(jax.random.key(4), 576, 960, 64, False)
    x = jnp.ones((4, 576))
    with pytest.raises(NotImplementedError, match="block size 256"):
        w4a16_matmul.w4a16_matmul(
            x,
            packed,
            scales,
            block_sizes=w4a16_matmul.BlockSizes(block_n=64, block_k=256),
            interpret=True,
        )
    a, sa = random_activation_codes(jax.random.key(5), 4, 576, 4, 0)
    with pytest.raises(NotImplementedError, match="block size 128"):
        w4ax_matmul.w4ax_matmul(
            a,
            sa,
            packed,
            scales,
            block_sizes=w4ax_matmul.BlockSizes(block_n=128, block_k=64),
            interpret=True,
        )


def test_xla_path_needs_no_pallas_support():
    """Shapes the kernels refuse still work on the XLA path (e.g. odd group counts)."""
    x = jax.random.normal(jax.random.key(6), (2, 64))
    codes, scales = dispatch.quantize_activations(x, bits=4, group_size=16, impl="xla")
    assert codes.shape == (2, 64) and scales.shape == (2, 4)
    y = dispatch.hadamard_transform(jnp.ones((2, 48)), impl="xla")
    assert y.shape == (2, 48)
