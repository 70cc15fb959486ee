"""The kernel test bases on the compiled Pallas (Triton) kernels; runs only on a GPU backend."""

import jax
import pytest
from hier_attention_test_base import HierAttentionBase
from kernel_test_base import ActQuantBase, HadamardBase, W4A16Base, W4AXBase

pytestmark = pytest.mark.skipif(
    jax.default_backend() not in ("gpu", "cuda"), reason="needs a GPU backend"
)


class TestW4A16PallasGpu(W4A16Base):
    IMPL = "pallas"


class TestW4AXPallasGpu(W4AXBase):
    IMPL = "pallas"


class TestActQuantPallasGpu(ActQuantBase):
    IMPL = "pallas"


class TestHadamardPallasGpu(HadamardBase):
    IMPL = "pallas"


class TestHierAttentionPallasGpu(HierAttentionBase):
    IMPL = "pallas"
