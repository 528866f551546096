"""Hypothesis strategies shared by the property tests."""

from __future__ import annotations

import torch
from hypothesis import strategies as st


def temperature(data: st.DataObject, dtypes: list[torch.dtype]) -> float | torch.Tensor:
    """A temperature 1e-6 .. 1e6 (log-uniform), a Python float or a 0-d tensor of a dtype that holds it."""
    tau = 10.0 ** data.draw(st.floats(-6, 6), label="log10 tau")
    if data.draw(st.booleans(), label="tensor tau"):
        fits = [d for d in dtypes if float(torch.finfo(d).max) > tau and torch.finfo(d).tiny < tau]
        tau = torch.tensor(tau, dtype=data.draw(st.sampled_from(fits), label="tau dtype"))
    return tau
