"""r1c.passes: the pass registry, textual pipelines, the pass manager, and the built-in passes."""

from r1c.passes import canonicalize, constant_fold, cse, dce, shape_inference  # noqa: F401  (register passes)
from r1c.passes.manager import PassManager, run_pipeline
from r1c.passes.numerics import NumericsError, compare_modules
from r1c.passes.pipeline import parse_pipeline
from r1c.passes.registry import OptionInfo, PassInfo, PipelineError, all_passes, get_pass, register_pass

__all__ = [
    "NumericsError",
    "OptionInfo",
    "PassInfo",
    "PassManager",
    "PipelineError",
    "all_passes",
    "compare_modules",
    "get_pass",
    "parse_pipeline",
    "register_pass",
    "run_pipeline",
]
