"""r1c: a compiler for DeepSeek-style models."""

__version__ = "0.1.0"
