"""The shared, functional KV cache."""

from qspec_jax.cache.kv_cache import KVCache, advance, rollback, set_lengths, write, write_layer

__all__ = ["KVCache", "advance", "rollback", "set_lengths", "write", "write_layer"]
