"""Private kernels: autograd Functions (and, later, optional Triton kernels) behind the public API."""
