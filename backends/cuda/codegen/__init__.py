"""Source generators of the cuda target: each module writes the Triton source of one kind of kernel (from the IR ops
it implements) and launches a loaded kernel of that kind on torch tensors."""
