"""r1c.passes: the pass registry, textual pipelines, the pass manager, and the built-in passes."""

from r1c.passes import (  # noqa: F401  (register passes)
    canonicalize,
    constant_fold,
    cse,
    dce,
    expert_fusion,
    grad,
    kv_quant,
    moe_aux_loss,
    pipeline_partition,
    shape_inference,
    sparse_attention_tiling,
)
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
