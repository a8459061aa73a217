"""Distributed runtime: pipeline-parallel training (with data-parallel replicas, optionally sharing the routed
experts: expert parallelism) and pipelined inference over torch.distributed (gloo on CPU); docs/distributed.md."""

from r1c.distributed.program import DistributedError, PipelineConfig, StagePlan, build_pipeline

__all__ = ["DistributedError", "PipelineConfig", "StagePlan", "build_pipeline"]
