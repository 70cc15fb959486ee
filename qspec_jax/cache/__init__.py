"""KV cache formats: the float cache and QuantSpec's hierarchical int4/int8 cache."""

from qspec_jax.cache.hierarchical import HierKVCache, HierLayout
from qspec_jax.cache.kv_cache import KVCache, advance, rollback, set_lengths, write, write_layer
from qspec_jax.cache.protocol import KV_FORMATS, CacheFormat, make_cache

__all__ = [
    "KV_FORMATS",
    "CacheFormat",
    "HierKVCache",
    "HierLayout",
    "KVCache",
    "advance",
    "make_cache",
    "rollback",
    "set_lengths",
    "write",
    "write_layer",
]
