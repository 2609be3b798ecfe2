"""Privacy accounting: the ε that a sequence of subsampled Gaussian mechanisms has spent, and the noise multiplier that
spends a target ε in a planned number of steps.

Both levels of fedhb's differential privacy are subsampled Gaussian mechanisms: client-level DP releases one noised
sum of clipped updates per round, each client sampled with probability ``q = clients per round / clients``;
sample-level DP-SGD takes noised steps on Poisson batches, each sample drawn with ``q = batch size / samples``. The
accountant composes them with opacus' Rényi-DP accountant (Mironov, Talwar and Zhang, arXiv 1908.10530, the
conversion to (ε, δ) of Balle et al., arXiv 1905.09982) or its PRV accountant (Gopi, Lee and Wutschitz, arXiv
2106.02848), which is tighter.

fedhb samples a fixed number of clients per round without replacement and accounts it as Poisson sampling with the
same rate, as TensorFlow Federated and opacus do; clients that drop out only lower the true rate.
"""

from __future__ import annotations

import math
import warnings
from typing import Any

import torch

#: Rényi orders searched by the RDP accountant: opacus' defaults and larger ones, so that small ε (many rounds of
#: large noise) are not cut off at order 63.
ALPHAS = [1 + x / 10.0 for x in range(1, 100)] + list(range(12, 64)) + [64, 80, 96, 128, 192, 256, 384, 512, 1024]


def _opacus(kind: str) -> Any:
    try:
        from opacus.accountants import PRVAccountant, RDPAccountant
    except ModuleNotFoundError:
        raise ModuleNotFoundError("fedhb's privacy accounting uses opacus: pip install 'fedhb[privacy]'") from None
    if kind == "rdp":
        return RDPAccountant()
    if kind == "prv":
        return PRVAccountant()
    raise ValueError(f"--privacy.accountant must be rdp or prv, got {kind!r}")


def epsilon(history: list[tuple[float, float, int]], delta: float, kind: str = "rdp") -> float:
    """ε after composing ``history``, a list of ``(noise_multiplier, sample_rate, steps)``: 0 for nothing released,
    infinite when any step had no noise."""
    history = [(float(s), float(q), int(n)) for s, q, n in history if n > 0 and q > 0]
    if not history:
        return 0.0
    if any(s <= 0 for s, _, _ in history):
        return math.inf
    accountant = _opacus(kind)
    accountant.history = history
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # "optimal order is the largest alpha": ALPHAS already goes far
        if kind == "rdp":
            return float(accountant.get_epsilon(delta=delta, alphas=ALPHAS))
        return float(accountant.get_epsilon(delta=delta))


def noise_for_epsilon(target: float, delta: float, sample_rate: float, steps: int, kind: str = "rdp",
                      tolerance: float = 0.005) -> float:
    """The smallest noise multiplier (to a relative ``tolerance`` of ε) whose ``steps`` steps at ``sample_rate``
    spend at most ``target``.

    Raises:
        ValueError: when no noise multiplier up to 1e4 reaches ``target`` (δ too small for so few samples).
    """
    if steps <= 0:
        return 0.0
    low, high = 0.0, 1.0
    while epsilon([(high, sample_rate, steps)], delta, kind) > target:
        low, high = high, 2 * high
        if high > 1e4:
            raise ValueError(f"--privacy.target_epsilon {target}: unreachable with --privacy.delta {delta} in {steps} "
                             f"steps at sampling rate {sample_rate:.4g}")
    while high - low > 1e-4 * high:
        mid = (low + high) / 2
        eps = epsilon([(mid, sample_rate, steps)], delta, kind)
        if eps > target:
            low = mid
        else:
            high = mid
            if eps >= target * (1 - tolerance):
                break
    return high


class Accountant:
    """The ledger of one privacy unit (the federation's clients, or one client's samples): every release as
    ``(noise_multiplier, sample_rate, steps)``, merged when consecutive entries agree. Its state is that list, so a
    resumed run reports the same ε.

    Args:
        delta: The δ at which ε is reported.
        kind: ``rdp`` or ``prv``.
    """

    def __init__(self, delta: float, kind: str = "rdp") -> None:
        self.delta, self.kind = delta, kind
        self.history: list[tuple[float, float, int]] = []

    def step(self, noise_multiplier: float, sample_rate: float, steps: int = 1) -> None:
        if steps <= 0:
            return
        if self.history and self.history[-1][:2] == (noise_multiplier, sample_rate):
            s, q, n = self.history[-1]
            self.history[-1] = (s, q, n + steps)
        else:
            self.history.append((float(noise_multiplier), float(sample_rate), int(steps)))

    @property
    def epsilon(self) -> float:
        return epsilon(self.history, self.delta, self.kind)

    def state_dict(self) -> dict[str, Any]:
        return {"history": torch.tensor(self.history, dtype=torch.float64).reshape(-1, 3)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.history = [(float(s), float(q), int(n)) for s, q, n in state["history"].tolist()]


def adaptive_noise(total: float, count_std: float) -> float:
    """The noise multiplier of the updates when adaptive clipping also releases a count with noise std
    ``count_std``, so that both together cost what one Gaussian mechanism of multiplier ``total`` costs
    (Andrew et al., arXiv 1905.03871, section 3): ``(total^-2 - (2 count_std)^-2)^-1/2``.

    Raises:
        ValueError: when ``total >= 2 count_std`` (the count alone would cost more than the budget).
    """
    if total <= 0:
        return 0.0
    if total >= 2 * count_std:
        raise ValueError(f"--privacy.adaptive_clip: the noise multiplier {total:.4g} is not below 2 x the count noise "
                         f"{count_std:.4g}: the count alone would spend the budget")
    return (total ** -2 - (2 * count_std) ** -2) ** -0.5
