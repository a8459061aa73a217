"""r1c: a compiler for DeepSeek-style models.

The public API (`load`, `optimize`, `compile`, `stats`) lives in `r1c.api`; importing `r1c` loads no frontend,
pass or backend until one is used.
"""

__version__ = "0.1.0"

from r1c.api import compile, load, load_artifact, load_weights, optimize, stats  # noqa: E402

__all__ = ["__version__", "compile", "load", "load_artifact", "load_weights", "optimize", "stats"]
