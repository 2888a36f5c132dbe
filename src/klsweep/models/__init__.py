"""Policy architectures. ``build_model`` turns the ``model`` config node into a module."""

from klsweep.models.tiny import KVCache, TinyGPT, TinyGPTConfig

__all__ = ["KVCache", "TinyGPT", "TinyGPTConfig"]
