"""The `cuda` target: Triton kernels that r1c generates or instantiates from templates, launched on torch CUDA
tensors. Nothing here imports torch or triton at package import, so `import r1c` stays cheap and CPU-only."""
