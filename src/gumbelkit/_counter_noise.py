r"""Counter-based noise: uniform and Gumbel draws as a pure function of ``(seed, position)``.

A ``torch.Generator`` is a stream: its n-th draw depends on every draw made before it, so a
row sampled alone and the same row sampled inside a batch, or a vocabulary shard on one
rank and the whole vocabulary on one process, see different noise. Counter-based noise
(Salmon et al. 2011, "Parallel random numbers: as easy as 1, 2, 3") hashes the coordinates
instead. Here the hash is the SplitMix64 generator (Steele, Lea and Flood 2014), whose
output at step ``n`` from state ``key`` is ``mix64(key + n * GAMMA)`` and which passes
TestU01's BigCrush:

.. math::
    \mathrm{key} = \mathrm{mix64}(\mathrm{seed}), \qquad
    h = \mathrm{mix64}(\mathrm{key} + \mathrm{position}\cdot\gamma \bmod 2^{64}), \qquad
    \gamma = \mathtt{0x9E3779B97F4A7C15}

    U = (\lfloor h / 2^{12} \rfloor + \tfrac12)\, 2^{-52} \in [2^{-53}, 1 - 2^{-53}], \qquad
    G = -\log(-\log U)

``mix64`` is SplitMix64's finalizer (Stafford's "Mix13": xor-shift 30, multiply, xor-shift
27, multiply, xor-shift 31). Each seed selects its own SplitMix64 stream (``key`` is a
bijection of the seed), and ``position`` indexes into it. The integer part is exact
int64 arithmetic (wrapping multiplication, logical shifts emulated with a mask), so ``U``
is bit-identical on every device and for every tensor layout; ``U`` is never 0 or 1, so
``G`` lies in about ``[-3.6, 36.7]`` and is never infinite. ``G`` is computed in float64
and rounded to the requested dtype.

In gumbelkit the position of a token is its vocabulary id: ``counter_gumbel(seed, token_id)``
is the noise a row with that seed adds to that token's logit, whoever computes it.
"""

from __future__ import annotations

import torch

__all__ = ["counter_gumbel", "counter_uniform", "mix64"]


def _signed(x: int) -> int:
    """The int64 with the same 64-bit pattern as the unsigned ``x``."""
    return x - (1 << 64) if x >= 1 << 63 else x


GAMMA = _signed(0x9E3779B97F4A7C15)
_M1 = _signed(0xBF58476D1CE4E5B9)
_M2 = _signed(0x94D049BB133111EB)


def _xorshift_(z: torch.Tensor, shift: int, tmp: torch.Tensor) -> torch.Tensor:
    """``z ^= z >>> shift`` in place (torch's ``>>`` on int64 is arithmetic: mask the sign fill)."""
    torch.bitwise_right_shift(z, shift, out=tmp)
    tmp.bitwise_and_((1 << (64 - shift)) - 1)
    return z.bitwise_xor_(tmp)


def _mix64_(z: torch.Tensor) -> torch.Tensor:
    tmp = torch.empty_like(z)
    _xorshift_(z, 30, tmp).mul_(_M1)
    _xorshift_(z, 27, tmp).mul_(_M2)
    return _xorshift_(z, 31, tmp)


def mix64(x: torch.Tensor) -> torch.Tensor:
    """SplitMix64's finalizer on the 64-bit patterns of an int64 tensor (a bijection).

    Example:
        >>> mix64(torch.tensor([0, 1])).tolist()  # 0 is its fixed point; 1 scatters
        [0, 6238072747940578789]
    """
    if not isinstance(x, torch.Tensor) or x.dtype != torch.int64:
        raise TypeError(f"mix64 takes an int64 tensor, got {getattr(x, 'dtype', type(x).__name__)}")
    return _mix64_(x.clone())


def _check_int64(t: object, name: str) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int64 torch.Tensor, got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(
            f"{name} must be an int64 tensor, got dtype {t.dtype}; convert it with {name}.long()"
        )
    return t


def _hash(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    seeds = _check_int64(seeds, "seeds")
    positions = _check_int64(positions, "positions")
    if seeds.device != positions.device:
        raise ValueError(
            f"seeds are on {seeds.device} but positions on {positions.device}; "
            "put them on one device"
        )
    try:
        torch.broadcast_shapes(seeds.shape, positions.shape)
    except RuntimeError as err:
        raise ValueError(
            f"seeds of shape {tuple(seeds.shape)} and positions of shape "
            f"{tuple(positions.shape)} do not broadcast together"
        ) from err
    key = _mix64_(seeds.clone())
    return _mix64_(positions * GAMMA + key)


def counter_uniform(seeds: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
    r"""Uniforms on the open interval (0, 1) as a pure function of ``(seed, position)``.

    :math:`U = (\lfloor h/2^{12}\rfloor + \frac12)\,2^{-52}` with ``h`` the SplitMix64 hash
    of the module docstring (Steele et al. 2014): 52 random bits, values in
    :math:`[2^{-53}, 1-2^{-53}]`, float64, bit-identical wherever and however computed.

    Args:
        seeds: int64 tensor (any value; each selects an independent stream).
        positions: int64 tensor of counters, broadcastable against ``seeds``.

    Returns:
        float64 tensor of the broadcast shape.

    Example:
        >>> u = counter_uniform(torch.tensor([[7], [8]]), torch.arange(100_000))
        >>> u.shape, bool(((u > 0) & (u < 1)).all()), round(u.mean().item(), 2)
        (torch.Size([2, 100000]), True, 0.5)
        >>> torch.equal(u[0, 5:9], counter_uniform(torch.tensor(7), torch.arange(5, 9)))
        True
    """
    h = _hash(seeds, positions)
    # The top 52 bits plus one half: exactly representable, never 0, never 1.
    top = torch.bitwise_right_shift(h, 12).bitwise_and_((1 << 52) - 1)
    return top.to(torch.float64).add_(0.5).mul_(2.0**-52)


def counter_gumbel(
    seeds: torch.Tensor, positions: torch.Tensor, dtype: torch.dtype = torch.float64
) -> torch.Tensor:
    r"""Standard Gumbel noise :math:`G = -\log(-\log U)` as a pure function of ``(seed, position)``.

    ``U`` is :func:`counter_uniform`; ``G`` is computed in float64 and rounded to ``dtype``,
    so the same ``(seed, position)`` gives the same bits in a batch of one or of a thousand,
    on one process or split across many (Gumbel 1954; Salmon et al. 2011).

    Example:
        >>> g = counter_gumbel(torch.tensor([[0]]), torch.arange(200_000), dtype=torch.float32)
        >>> g.dtype, round(g.mean().item(), 2)  # Euler's constant 0.5772...
        (torch.float32, 0.58)
    """
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise TypeError(f"dtype must be a floating dtype, got {dtype}")
    u = counter_uniform(seeds, positions)
    return u.log_().neg_().log_().neg_().to(dtype)
