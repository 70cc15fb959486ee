"""The kernel test bases run through the XLA paths (the ones the model uses on CPU)."""

from kernel_test_base import ActQuantBase, HadamardBase, W4A16Base, W4AXBase


class TestW4A16Xla(W4A16Base):
    IMPL = "xla"


class TestW4AXXla(W4AXBase):
    IMPL = "xla"


class TestActQuantXla(ActQuantBase):
    IMPL = "xla"


class TestHadamardXla(HadamardBase):
    IMPL = "xla"
