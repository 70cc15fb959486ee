"""A long-lived engine bounds the compiled programs it holds, so memory mappings stay bounded.

XLA:CPU keeps each program's machine code in its own memory mappings, and Linux refuses
mappings past vm.max_map_count (65530 by default), where the compiler crashes. The engine keeps
at most `max_programs` generation programs (least recently used evicted, JAX's jit caches
cleared with them).
"""

import sys

import pytest

import qspec_jax
from qspec_jax.engine import memory_maps

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="/proc/self/maps")

# (prompt length, max_new_tokens): each pair is its own program (prompt bucket x output bucket)
SHAPES = [(3, 8), (20, 8), (40, 8), (3, 40), (20, 40), (40, 40), (70, 8), (70, 40)]


def test_engine_holds_at_most_max_programs_and_mappings_stay_bounded():
    eng = qspec_jax.load("tiny", compile_cache=False)
    eng.max_programs = 2

    def run(n_prompt, n_new):
        res = eng.generate([[5] * n_prompt], "fp", max_new_tokens=n_new)
        assert res.stats["compile_source"] == "compiled"  # a new program each time

    before = memory_maps()
    for shape in SHAPES[:2]:
        run(*shape)
    per_program = max((memory_maps() - before) / 2, 1)
    for shape in SHAPES[2:]:
        run(*shape)
        assert eng.num_compiled <= 2
    grown = memory_maps() - before
    # Budget: what the 2 held programs cost plus 2 more of slack for allocator and runtime
    # mappings; holding all 8 programs would cost about 8 per-program units.
    assert grown <= 4 * per_program, (grown, per_program)
    # the newest program is still held: the same call again compiles nothing
    res = eng.generate([[5] * 70], "fp", max_new_tokens=40)
    assert res.stats["compile_source"] == "memory"
