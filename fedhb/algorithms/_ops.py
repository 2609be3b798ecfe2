"""Pure tensor maths shared by the algorithms; no Fabric, no modules."""

from __future__ import annotations

import torch
from torch import Tensor

State = dict[str, Tensor]


def weighted_average(states: list[State], weights: list[float] | Tensor, keys: list[str] | None = None) -> State:
    """``sum_k w_k * state_k / sum_k w_k`` for every key (in float64, cast back to each tensor's dtype)."""
    w = torch.as_tensor(weights, dtype=torch.float64)
    if len(states) == 0 or w.sum() <= 0:
        raise ValueError("weighted_average needs at least one state with positive weight")
    w = w / w.sum()
    keys = list(states[0]) if keys is None else keys
    out: State = {}
    for k in keys:
        # A running sum, not a stack of all clients: the server's transient memory stays one tensor, not n.
        total = torch.zeros(states[0][k].shape, dtype=torch.float64)
        for weight, s in zip(w.tolist(), states):
            total.add_(s[k].to(torch.float64), alpha=weight)
        out[k] = total.to(states[0][k].dtype)
    return out






def pairwise_distance(vectors: Tensor, kind: str = "frobenius", block_elements: int = 1 << 16,
                      add_to: Tensor | None = None) -> Tensor:
    """``(n, n)`` distances between the rows of ``vectors``: Euclidean (the Frobenius norm of the matrix difference)
    or cosine (``1 - cos``).

    Euclidean distances are computed exactly, as ``sqrt(sum_k (v_ik - v_jk)^2)`` rather than with the Gram shortcut
    ``|v_i|^2 + |v_j|^2 - 2 v_i.v_j``, which cancels badly for nearby rows and depends on n through the matmul. Rows
    are taken in blocks of ``b`` so that the ``(b, n, d)`` difference tensor holds at most ``block_elements`` values
    (at least one row): memory grows linearly with n, not as ``n^2 d``, and every distance is the same whatever the
    block size or n, since each one is reduced over ``d`` alone. With ``add_to`` (an ``(n, n)`` float64 tensor) the
    distances are added into it, block by block, and it is returned.
    """
    v = vectors.to(torch.float64).reshape(len(vectors), -1)
    if kind == "frobenius":
        n, d = v.shape
        rows = max(1, block_elements // max(1, n * d))
        out = torch.empty(n, n, dtype=torch.float64) if add_to is None else add_to
        # One difference buffer and one row buffer for every block: allocating a fresh (rows, n, d) tensor per block
        # fragments the heap, and peak memory then grows with n even though each block is freed.
        diff = torch.empty(min(rows, n), n, d, dtype=torch.float64)
        block = torch.empty(min(rows, n), n, dtype=torch.float64)
        for start in range(0, n, rows):
            k = min(rows, n - start)
            torch.sub(v[start:start + k, None, :], v[None, :, :], out=diff[:k])
            torch.sum(diff[:k].pow_(2), -1, out=block[:k])
            block[:k].sqrt_()
            if add_to is None:
                out[start:start + k] = block[:k]
            else:
                out[start:start + k] += block[:k]
        return out
    if kind == "cosine":
        norm = v.norm(dim=1, keepdim=True).clamp_min(1e-12)
        u = v / norm
        cosine = (1 - u @ u.T).clamp_min(0)
        return cosine if add_to is None else add_to.add_(cosine)
    raise ValueError(f"--algorithm.distance must be frobenius or cosine; got {kind!r}")


def inverse_distance_weights(distance: Tensor) -> Tensor:
    """Row-normalized ``1/d_ij`` over ``j != i`` (the diagonal is 0).

    Clients at distance 0 from ``i`` are infinitely similar: they share row ``i``'s weight equally and the others get
    none (the limit of ``1/d``), so identical B matrices give no NaN. With a single client the row is all zeros.
    """
    n = distance.shape[0]
    weights = torch.zeros_like(distance)
    for i in range(n):
        d = torch.cat([distance[i, :i], distance[i, i + 1:]])  # row i without its diagonal
        if d.numel() == 0:
            continue
        zero = d <= 0
        row = zero.to(d.dtype) / zero.sum() if zero.any() else (1 / d) / (1 / d).sum()
        weights[i, :i], weights[i, i + 1:] = row[:i], row[i:]
    return weights


def state_bytes(state: State) -> int:
    """Bytes on the wire for ``state``: the sum of its tensors' sizes."""
    return sum(t.numel() * t.element_size() for t in state.values())


def linear_combination(states: list[State], coeffs: list[float] | Tensor, keys: list[str] | None = None) -> State:
    """``sum_k c_k * state_k`` for every key, without normalizing the coefficients (in float64, cast back)."""
    c = torch.as_tensor(coeffs, dtype=torch.float64)
    keys = list(states[0]) if keys is None else keys
    out: State = {}
    for k in keys:
        stacked = torch.stack([s[k].to(torch.float64).to(c.device) for s in states])
        out[k] = torch.tensordot(c, stacked, dims=1).to(states[0][k].dtype)
    return out


def is_head(name: str) -> bool:
    """Whether ``name`` is a tensor of the task head (``head.1.weight``/``head.1.bias``: the client model names its
    head ``head``)."""
    return name.startswith("head.")




def stack_lora(a: list[Tensor], b: list[Tensor], weights: list[float] | Tensor,
               scalings: list[float] | None = None) -> tuple[Tensor, Tensor]:
    """FLoRA's stacking: ``A = [w_1 s_1 A_1; ...; w_n s_n A_n]`` (rows) and ``B = [B_1, ..., B_n]`` (columns).

    ``B @ A = sum_k w_k s_k B_k A_k`` exactly, for any ranks ``r_k`` (``A_k``: ``(r_k, in)``, ``B_k``: ``(out, r_k)``),
    which averaging A and B separately does not give. ``weights`` are used as given (normalize them first); ``scalings``
    are the per-client LoRA scalings ``alpha / r_k`` (default 1).
    """
    w = torch.as_tensor(weights, dtype=torch.float64)
    s = torch.ones_like(w) if scalings is None else torch.as_tensor(scalings, dtype=torch.float64)
    for k, (ak, bk) in enumerate(zip(a, b)):
        if ak.shape[0] != bk.shape[1]:
            raise ValueError(f"client {k}: A has rank {ak.shape[0]} but B has {bk.shape[1]} columns")
    stacked_a = torch.cat([(w[k] * s[k]) * ak.to(torch.float64) for k, ak in enumerate(a)], dim=0)
    stacked_b = torch.cat([bk.to(torch.float64) for bk in b], dim=1)
    return stacked_a, stacked_b


def fedopt_step(x: Tensor, delta: Tensor, m: Tensor, v: Tensor, rule: str, lr: float, beta1: float, beta2: float,
                tau: float) -> tuple[Tensor, Tensor, Tensor]:
    """One server step of Adaptive Federated Optimization (Reddi et al., arXiv 2003.00295, Algorithm 2).

    ``m = beta1 m + (1 - beta1) delta``; ``v`` by ``rule``: ``adagrad`` ``v + delta^2``, ``adam``
    ``beta2 v + (1 - beta2) delta^2``, ``yogi`` ``v - (1 - beta2) delta^2 sign(v - delta^2)``; then
    ``x + lr m / (sqrt(v) + tau)``. ``delta`` is the averaged client update (new minus old), not a gradient.
    Returns ``(x, m, v)``.
    """
    m = beta1 * m + (1 - beta1) * delta
    d2 = delta * delta
    if rule == "adagrad":
        v = v + d2
    elif rule == "adam":
        v = beta2 * v + (1 - beta2) * d2
    elif rule == "yogi":
        v = v - (1 - beta2) * d2 * torch.sign(v - d2)
    else:
        raise ValueError(f"unknown FedOpt rule {rule!r}; expected adagrad, adam or yogi")
    return x + lr * m / (v.sqrt() + tau), m, v


def scaffold_control_variate(c_i: Tensor, c: Tensor, x: Tensor, y: Tensor, steps: int, lr: float) -> Tensor:
    """SCAFFOLD's option II client control variate (arXiv 1910.06378, eq. 4): ``c_i - c + (x - y) / (K lr)``."""
    if steps <= 0:
        return c_i
    return c_i - c + (x - y) / (steps * lr)


def fednova_norm(steps: int, momentum: float = 0.0) -> float:
    """``||a_i||_1`` of FedNova (arXiv 2007.07481): ``tau`` for plain SGD; with SGD momentum ``rho``,
    ``sum_{k=1..tau} (1 - rho^k) / (1 - rho)``."""
    if momentum == 0:
        return float(steps)
    return (steps - momentum * (1 - momentum ** steps) / (1 - momentum)) / (1 - momentum)


def model_contrastive_loss(z: Tensor, z_glob: Tensor, z_prev: Tensor, temperature: float) -> Tensor:
    """MOON's term (arXiv 2103.16257, eq. 3), averaged over the batch:
    ``-log(exp(cos(z, z_glob)/t) / (exp(cos(z, z_glob)/t) + exp(cos(z, z_prev)/t)))``."""
    pos = torch.nn.functional.cosine_similarity(z, z_glob, dim=-1) / temperature
    neg = torch.nn.functional.cosine_similarity(z, z_prev, dim=-1) / temperature
    return (torch.logsumexp(torch.stack([pos, neg]), dim=0) - pos).mean()


def ala_weight_step(weight: Tensor, grad: Tensor, global_: Tensor, local: Tensor, eta: float) -> Tensor:
    """FedALA's element-wise weight update (arXiv 2212.01197, eq. 6): ``clip(W - eta g * (global - local), 0, 1)``,
    where ``g`` is the loss gradient at ``local + (global - local) * W``."""
    return torch.clamp(weight - eta * grad * (global_ - local), 0, 1)


def coordinate_median(values: Tensor) -> Tensor:
    """Element-wise median over the first dimension (clients), the mean of the two middle values for an even count
    (``numpy.median``'s, which Flower's FedMedian uses)."""
    return torch.quantile(values.to(torch.float64), 0.5, dim=0) if values.shape[0] > 0 else values


def trimmed_mean(values: Tensor, beta: float) -> Tensor:
    """Element-wise mean over the first dimension after cutting ``int(beta * n)`` values from each end (Flower's
    ``_trim_mean``, after scipy's ``trim_mean``)."""
    n = values.shape[0]
    cut = int(beta * n)
    if 2 * cut >= n:
        raise ValueError(f"--algorithm.trim={beta} cuts all {n} clients' values; use trim < 0.5")
    return values.to(torch.float64).sort(dim=0).values[cut:n - cut].mean(0)


def krum_scores(vectors: Tensor, num_malicious: int) -> Tensor:
    """Krum's score of each row (Blanchard et al., NeurIPS 2017): the sum of its squared distances to its
    ``max(1, n - f - 2)`` nearest other rows (Flower's ``aggregate_krum``)."""
    v = vectors.to(torch.float64)
    d = (v[:, None, :] - v[None, :, :]).pow(2).sum(-1)
    n = v.shape[0]
    closest = max(1, n - num_malicious - 2)
    d = d + torch.diag(torch.full((n,), float("inf"), dtype=torch.float64))  # a row is not its own neighbour
    return d.sort(dim=1).values[:, :min(closest, n - 1)].sum(1) if n > 1 else torch.zeros(n, dtype=torch.float64)
