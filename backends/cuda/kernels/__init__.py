"""Triton kernel templates for the fused ops (one file per family). Each public launcher takes and returns torch
tensors with exactly the semantics of the IR op it implements (the op's numpy reference is the oracle), and is
registered under that op's name in `r1c.backends.cuda.launchers`."""
