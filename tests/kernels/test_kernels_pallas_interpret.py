"""The kernel test bases rerun on the Pallas kernels in interpret mode (CPU)."""

from kernel_test_base import ActQuantBase, HadamardBase, W4A16Base, W4AXBase


class TestW4A16PallasInterpret(W4A16Base):
    IMPL = "pallas_interpret"


class TestW4AXPallasInterpret(W4AXBase):
    IMPL = "pallas_interpret"


class TestActQuantPallasInterpret(ActQuantBase):
    IMPL = "pallas_interpret"


class TestHadamardPallasInterpret(HadamardBase):
    IMPL = "pallas_interpret"
