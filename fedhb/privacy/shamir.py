"""Shamir's ``t``-out-of-``n`` secret sharing (Shamir, "How to Share a Secret", CACM 1979) over the prime field of
the Mersenne prime ``2^521 - 1``, for secrets of up to 64 bytes (secure aggregation shares 32-byte keys and seeds).

A secret ``s`` is the constant term of a random polynomial of degree ``t - 1``; holder ``x`` gets its value at ``x``.
Any ``t`` shares give ``s`` back by Lagrange interpolation at 0; ``t - 1`` shares are consistent with every secret, so
they tell nothing about it.
"""

from __future__ import annotations

import secrets
from collections.abc import Callable, Sequence

#: The field's prime, 2^521 - 1.
PRIME = (1 << 521) - 1
#: A share: ``(x, f(x))`` with ``x`` in 1 .. PRIME - 1.
Share = tuple[int, int]


class NotEnoughShares(RuntimeError):
    """Fewer shares than the threshold: the secret cannot be reconstructed."""


def split(secret: bytes, threshold: int, holders: Sequence[int], randbelow: Callable[[int], int] | None = None
          ) -> list[Share]:
    """Shares of ``secret`` for ``holders`` (distinct positive ids), any ``threshold`` of which reconstruct it.

    Args:
        secret: At most 64 bytes.
        threshold: Shares needed, ``1 <= threshold <= len(holders)``.
        holders: The share positions ``x`` (e.g. client id + 1; never 0, the secret's own position).
        randbelow: The coefficients' source (default :func:`secrets.randbelow`; secure aggregation's simulation
            passes a keyed stream so that every rank derives the same shares).
    """
    if len(secret) > 64:
        raise ValueError(f"a Shamir secret holds at most 64 bytes, got {len(secret)}")
    if not 1 <= threshold <= len(holders):
        raise ValueError(f"threshold must be in [1, {len(holders)}] for {len(holders)} holders, got {threshold}")
    if len(set(holders)) != len(holders) or any(not 0 < x < PRIME for x in holders):
        raise ValueError("share holders must be distinct positive ids")
    draw = randbelow or secrets.randbelow
    coeffs = [int.from_bytes(secret, "big")] + [draw(PRIME) for _ in range(threshold - 1)]
    shares = []
    for x in holders:
        y = 0
        for c in reversed(coeffs):  # Horner
            y = (y * x + c) % PRIME
        shares.append((x, y))
    return shares


def combine(shares: Sequence[Share], threshold: int, length: int = 32) -> bytes:
    """The secret (``length`` bytes) from at least ``threshold`` shares; only the first ``threshold`` are used.

    Raises:
        NotEnoughShares: fewer than ``threshold`` shares.
    """
    if len(shares) < threshold:
        raise NotEnoughShares(f"{len(shares)} shares, {threshold} needed")
    used = list(shares)[:threshold]
    secret = 0
    for j, (xj, yj) in enumerate(used):
        num, den = 1, 1
        for m, (xm, _) in enumerate(used):
            if m != j:
                num = num * (-xm) % PRIME
                den = den * (xj - xm) % PRIME
        secret = (secret + yj * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 1 << (8 * length):
        raise ValueError("the shares do not belong to one secret of this length (inconsistent shares)")
    return secret.to_bytes(length, "big")
