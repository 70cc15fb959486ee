"""Exported programs (`qspec_jax.exported`): the same results as the jitted function, a damaged or
foreign file never used, and no file when the program spans several devices.

The whole-process path (a second `qspec-jax` process reads the generation program instead of
tracing it) is tested in tests/test_compile_once.py.
"""

from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import struct

from qspec_jax import exported

pytest.importorskip("flatbuffers")


@struct.dataclass
class Box:
    """A registered pytree with a static field, like the model's Params and caches."""

    values: jax.Array  # [n]
    scale: float = struct.field(pytree_node=False, default=2.0)


def step(box: Box, x: jax.Array, *, power: int) -> tuple[Box, jax.Array]:
    """A small program with a loop, a static argument and a custom pytree in and out."""
    y = jax.lax.fori_loop(0, power, lambda _, v: v * x, jnp.ones_like(x))  # [n]
    return box.replace(values=box.values + y * box.scale), jnp.sum(y)


def _args():
    return Box(jnp.arange(4.0)), jnp.asarray([1.0, 2.0, 3.0, 4.0])


def test_written_then_read_equals_the_jitted_function(tmp_path):
    want = jax.jit(step, static_argnames="power")(*_args(), power=3)
    written = exported.compile_program(
        step, _args(), {"power": 3}, name="t", donate=(0,), directory=str(tmp_path)
    )
    assert written is not None and written.source == "exported-written"
    assert len(os.listdir(tmp_path)) == 1
    read = exported.compile_program(
        step, _args(), {"power": 3}, name="t", donate=(0,), directory=str(tmp_path)
    )
    assert read.source == "exported-read"
    for program in (written, read):
        box, total = program(*_args())
        assert isinstance(box, Box) and box.scale == 2.0
        np.testing.assert_array_equal(box.values, want[0].values)  # bit-equal: same HLO
        np.testing.assert_array_equal(total, want[1])


def test_other_static_arguments_or_shapes_are_other_programs(tmp_path):
    d = str(tmp_path)
    exported.compile_program(step, _args(), {"power": 3}, name="t", directory=d)
    other = exported.compile_program(step, _args(), {"power": 4}, name="t", directory=d)
    assert other.source == "exported-written"
    bigger = (Box(jnp.arange(8.0)), jnp.ones(8))
    assert exported.compile_program(step, bigger, {"power": 3}, name="t", directory=d).source == (
        "exported-written"
    )
    assert len(os.listdir(tmp_path)) == 3
    np.testing.assert_array_equal(other(*_args())[1], jnp.sum(jnp.asarray([1.0, 16, 81, 256])))


def test_a_damaged_file_is_replaced_not_used(tmp_path):
    d = str(tmp_path)
    exported.compile_program(step, _args(), {"power": 3}, name="t", directory=d)
    (path,) = [os.path.join(d, f) for f in os.listdir(d)]
    with open(path, "r+b") as f:
        f.seek(40)
        f.write(b"\xff" * 64)
    again = exported.compile_program(step, _args(), {"power": 3}, name="t", directory=d)
    assert again.source == "exported-written"
    np.testing.assert_array_equal(again(*_args())[1], 100.0)  # 1 + 8 + 27 + 64
    assert exported.compile_program(step, _args(), {"power": 3}, name="t", directory=d).source == (
        "exported-read"
    )


def test_switched_off(tmp_path, monkeypatch):
    monkeypatch.setenv(exported.ENV_EXPORT, "0")
    assert exported.compile_program(step, _args(), {"power": 3}, name="t",
                                    directory=str(tmp_path)) is None  # fmt: skip
    assert not os.listdir(tmp_path)


def test_one_buffer_in_two_donated_leaves(tmp_path):
    """A fresh cache may hold one zero array in several fields; the program still runs."""
    zeros = jnp.zeros(4)
    args = (Box(zeros), zeros)  # the same buffer twice, both donated
    program = exported.compile_program(
        step, args, {"power": 2}, name="t", donate=(0, 1), directory=str(tmp_path)
    )
    box, total = program(*args)
    np.testing.assert_array_equal(box.values, jnp.zeros(4))  # 0 + 0 * 0 * 2
    np.testing.assert_array_equal(total, 0.0)
