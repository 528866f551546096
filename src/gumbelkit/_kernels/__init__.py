"""Private kernels behind the public API, chosen in :mod:`.dispatch`.

- :mod:`.ops`: the samplers as registered PyTorch operators (fake implementations, vmap rules);
- :mod:`.gumbel_softmax`: the Gumbel-Softmax ``autograd.Function`` (closed-form backward, jvp);
- :mod:`.cpu_noise`: the torch path's seeded, exact-tail Gumbel noise;
- :mod:`.cpu_fused`: fused numba CPU kernels (optional extra ``[numba]``);
- :mod:`.triton_gumbel`: fused Triton kernels for CUDA tensors (optional extra ``[triton]``);
- :mod:`.estimators`: the gradient estimators' operators and surrogates.
"""
