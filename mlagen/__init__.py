"""mlagen: generate, compile, tune and ship CuTe-DSL kernels for DeepSeek MLA inference."""
from ._version import __version__


def __getattr__(name):
    # the decode branch (and its runtime) load on first use: `import mlagen` stays light
    if name in ("mla_decode_branch", "MLADecodeBranch", "PagedLatentCache"):
        from . import decode_branch
        return getattr(decode_branch, name)
    raise AttributeError(f"module 'mlagen' has no attribute {name!r}")


__all__ = ["__version__", "mla_decode_branch", "MLADecodeBranch", "PagedLatentCache"]
