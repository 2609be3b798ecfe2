"""Secure aggregation: the server learns the sum of the clients' updates and nothing else about any one of them.

The protocol is SecAgg (Bonawitz et al., "Practical Secure Aggregation for Privacy-Preserving Machine Learning", CCS
2017) with SecAgg+'s sparse masking graph as an option (Bell et al., "Secure Single-Server Aggregation with
(Poly)Logarithmic Overhead", arXiv 2009.01471). For a round with participants ``U`` (the selected clients):

1. Each client ``u`` has an X25519 key pair and a self-mask seed ``b_u``; it advertises its public key and gives each
   of its holders (its neighbours in the masking graph, and itself) a Shamir share of its private key and of ``b_u``,
   with a reconstruction threshold of ``holders - threshold``.
2. After training, ``u`` quantises its update (what it uploads minus what it received) to fixed point, multiplies it
   by its weight, and uploads ``y_u = x_u + PRG(b_u) + sum_{v > u} PRG(s_uv) - sum_{v < u} PRG(s_uv) mod 2^r`` over its
   neighbours ``v``, where ``s_uv`` is the X25519 agreement of ``u`` and ``v`` through HKDF-SHA256 and ``PRG`` a
   ChaCha20 key stream. Alone, ``y_u`` is uniform on the ring whatever ``x_u`` is.
3. The server sums the masked uploads that arrived. For each participant ``d`` that dropped, the survivors among
   its holders hand in their shares of its private key: the server rebuilds it and removes ``d``'s pairwise masks
   from its surviving neighbours' uploads. For each survivor, the shares of ``b_u`` remove its self mask. A round
   with more than ``threshold`` dropped holders of any client cannot be unmasked and stops with an error.

The server step of the wrapped algorithm then runs on the mean update as if every surviving client had uploaded it,
which is exact for the algorithms whose server step is an average (:func:`fedhb.privacy.client_dp.server_step`);
others are refused. Composed with client-level DP, the noise is added to the unmasked mean by the server
(``--secure_aggregation.noise server``) or in shares by the clients before masking (``distributed``, each adding the
variance for ``clients per round - threshold`` reports, so any round that can be unmasked carries at least the noise ε
needs).

What fedhb simulates rather than runs: the clients' secrets come from the run seed through HKDF (so every process
can play the key-advertisement round without a collective, and a rerun is identical; a deployment draws them from
the OS), the shares travel in memory unencrypted, and the server is honest-but-curious. The arithmetic, the keys, the
masks and the recovery are real. Coordinates are clamped to ``[-clip_range, clip_range]`` (an update beyond it is
cut, not wrapped), so with client-level DP the clip bounds the whole update and ``clip_range`` each coordinate.

Client state: ``algo/secagg/masked`` (this round's masked upload), ``algo/secagg/round`` (its round, uploaded in the
clear so the server can rebuild the round's graph).
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import math
import time
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from torch import Tensor

from fedhb import seeds
from fedhb.algorithms._ops import State
from fedhb.algorithms.base import ALGO_PREFIX, Aggregate, Algorithm, algo_key
from fedhb.privacy import shamir
from fedhb.privacy.client_dp import ClientDP, server_step

if TYPE_CHECKING:
    from fedhb.algorithms.trainer import LocalTrainer
    from fedhb.config import SecureAggregationArgs

MASKED = algo_key("secagg", "masked")
ROUND = algo_key("secagg", "round")
#: Bytes of one Shamir share on the wire: its field element (521 bits) and its position.
SHARE_BYTES = 66 + 4
#: Bytes of one advertised public key (X25519); SecAgg advertises two per client (encryption and masking).
KEY_BYTES = 32

Layout = list[tuple[str, torch.Size, torch.dtype]]


# -- fixed point -------------------------------------------------------------------------------------------------------
def quantize(x: Tensor, clip_range: float, bits: int) -> Tensor:
    """``round(clamp(x, -R, R) * (2^(bits-1) - 1) / R)`` as int64: signed fixed point with step
    ``R / (2^(bits-1) - 1)``, an error of at most half a step inside the range."""
    scale = (2 ** (bits - 1) - 1) / clip_range
    return torch.round(x.to(torch.float64).clamp(-clip_range, clip_range) * scale).to(torch.int64)


def dequantize(q: Tensor, clip_range: float, bits: int) -> Tensor:
    return q.to(torch.float64) * (clip_range / (2 ** (bits - 1) - 1))


def ring_bits(bits: int, weight_sum: int) -> int:
    """Bits of the ring the masked integers live in: room for a weighted sum of ``bits``-bit values of total weight
    ``weight_sum``, and its sign."""
    return bits + 1 + max(0, math.ceil(math.log2(max(1, weight_sum))))


# -- the protocol's pieces ---------------------------------------------------------------------------------------------
def _hkdf(material: bytes, info: bytes, length: int = 32) -> bytes:
    from cryptography.hazmat.primitives import hashes
    from cryptography.hazmat.primitives.kdf.hkdf import HKDF

    return HKDF(algorithm=hashes.SHA256(), length=length, salt=None, info=info).derive(material)


def prg(key: bytes, n: int, ring: int) -> Tensor:
    """``n`` uniform integers on ``[0, 2^ring)`` from a ChaCha20 key stream under ``key`` (int64)."""
    from cryptography.hazmat.primitives.ciphers import Cipher, algorithms

    stream = Cipher(algorithms.ChaCha20(key, bytes(16)), mode=None).encryptor().update(bytes(8 * n))
    words = np.frombuffer(stream, dtype=np.uint64) & np.uint64((1 << ring) - 1)
    return torch.from_numpy(words.astype(np.int64))


def harary_neighbours(participants: list[int], degree: int, seed: int, rnd: int) -> dict[int, list[int]]:
    """SecAgg+'s masking graph: the participants on a ring in a random order (from the run seed and round), each
    joined to the ``degree / 2`` nearest on either side; every pair when ``degree`` is 0 or at least
    ``len(participants) - 1``."""
    n = len(participants)
    if degree == 0 or degree >= n - 1:
        return {u: [v for v in participants if v != u] for u in participants}
    order = [participants[i] for i in seeds.rng(seed, rnd, seeds.Stream.SECAGG).permutation(n)]
    where = {u: i for i, u in enumerate(order)}
    half = degree // 2
    return {u: sorted({order[(where[u] + d) % n] for d in range(-half, half + 1) if d != 0}) for u in participants}


class Protocol:
    """One federation's secure-aggregation arithmetic: secrets, graph, masking and unmasking.

    Args:
        seed: The run seed (the simulation derives each client's secrets from it).
        threshold: Dropped holders tolerated per secret.
        degree: Neighbours per client (0: all).
        ring: Bits of the ring.
    """

    def __init__(self, seed: int, threshold: int, degree: int, ring: int) -> None:
        self.seed, self.threshold, self.degree, self.ring = seed, threshold, degree, ring

    @property
    def modulus_mask(self) -> int:
        return (1 << self.ring) - 1

    def graph(self, rnd: int, participants: tuple[int, ...]) -> dict[int, list[int]]:
        return _graph(self.seed, self.degree, rnd, participants)

    def holders(self, rnd: int, participants: tuple[int, ...], u: int) -> list[int]:
        return sorted([u, *self.graph(rnd, participants)[u]])

    def needed(self, rnd: int, participants: tuple[int, ...], u: int) -> int:
        return len(self.holders(rnd, participants, u)) - self.threshold

    # Each client's secrets (round 0 of the protocol).
    def material(self, rnd: int, u: int) -> bytes:
        words = np.random.SeedSequence([self.seed, rnd, u, int(seeds.Stream.SECAGG)]).generate_state(8)
        return words.astype(np.uint32).tobytes()

    def mask_key(self, rnd: int, u: int) -> bytes:
        """Client ``u``'s X25519 private key for the pairwise masks (32 bytes)."""
        return _hkdf(self.material(rnd, u), b"fedhb-secagg mask key")

    def self_seed(self, rnd: int, u: int) -> bytes:
        return _hkdf(self.material(rnd, u), b"fedhb-secagg self mask")

    def public_key(self, rnd: int, u: int) -> bytes:
        return _public_key(self.mask_key(rnd, u))

    def pair_seed(self, private: bytes, public: bytes, rnd: int) -> bytes:
        """``s_uv``: X25519 agreement through HKDF, the same for ``u`` and ``v``."""
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey

        shared = X25519PrivateKey.from_private_bytes(private).exchange(X25519PublicKey.from_public_bytes(public))
        return _hkdf(shared, b"fedhb-secagg pair mask " + rnd.to_bytes(8, "little"))

    # Shares (round 1).
    def shares(self, rnd: int, participants: tuple[int, ...], u: int, secret: str) -> dict[int, shamir.Share]:
        """The Shamir shares of ``u``'s ``secret`` (``mask_key`` or ``self_seed``), by holder."""
        value = self.mask_key(rnd, u) if secret == "mask_key" else self.self_seed(rnd, u)
        holders = self.holders(rnd, participants, u)
        stream = hashlib.shake_256(self.material(rnd, u) + secret.encode()).digest(80 * len(holders))
        chunks = iter(int.from_bytes(stream[i:i + 80], "big") for i in range(0, len(stream), 80))
        shares = shamir.split(value, self.needed(rnd, participants, u), [h + 1 for h in holders],
                              randbelow=lambda p: next(chunks) % p)
        return dict(zip(holders, shares))

    # Round 2: masked input.
    def mask(self, rnd: int, participants: tuple[int, ...], u: int, values: Tensor) -> Tensor:
        """``u``'s masked upload of ``values`` (int64, any sign) on the ring."""
        n, m = values.numel(), self.modulus_mask
        out = (values.reshape(-1) & m) + prg(self.self_seed(rnd, u), n, self.ring)
        private = self.mask_key(rnd, u)
        for v in self.graph(rnd, participants)[u]:
            pair = prg(self.pair_seed(private, self.public_key(rnd, v), rnd), n, self.ring)
            out = (out + pair if v > u else out - pair) & m
        return out & m

    # Round 3: unmasking.
    def unmask(self, rnd: int, participants: tuple[int, ...], masked: Mapping[int, Tensor]) -> Tensor:
        """The signed sum of the survivors' values from their masked uploads.

        Raises:
            RuntimeError: more than ``threshold`` holders of a needed secret dropped.
        """
        survivors = sorted(masked)
        alive = set(survivors)
        dropped = [u for u in participants if u not in alive]
        graph = self.graph(rnd, participants)
        m = self.modulus_mask
        n = next(iter(masked.values())).numel()
        total = torch.zeros(n, dtype=torch.int64)
        for u in survivors:
            total = (total + masked[u].to(torch.int64)) & m

        def rebuild(u: int, secret: str) -> bytes:
            shares = self.shares(rnd, participants, u, secret)
            handed_in = [shares[h] for h in self.holders(rnd, participants, u) if h in alive]
            need = self.needed(rnd, participants, u)
            if len(handed_in) < need:
                lost = len(shares) - len(handed_in)
                raise RuntimeError(
                    f"secure aggregation: round {rnd}: {lost} of the {len(shares)} holders of client {u}'s "
                    f"{'mask key' if secret == 'mask_key' else 'self mask'} dropped, more than "
                    f"--secure_aggregation.threshold={self.threshold}; the sum cannot be unmasked ({len(dropped)} of "
                    f"{len(participants)} clients dropped). Set --federation.min_clients to "
                    f"{len(participants) - self.threshold} "
                    f"so that the loop redraws such a round, or lower --federation.dropout.")
            return shamir.combine(handed_in, need)

        for d in dropped:
            private = rebuild(d, "mask_key")
            for v in graph[d]:
                if v in alive:  # v's upload holds +PRG(s_vd) if d > v, else -PRG(s_vd)
                    pair = prg(self.pair_seed(private, self.public_key(rnd, v), rnd), n, self.ring)
                    total = (total - pair if d > v else total + pair) & m
        for u in survivors:
            total = (total - prg(rebuild(u, "self_seed"), n, self.ring)) & m
        half = 1 << (self.ring - 1)
        return torch.where(total >= half, total - (1 << self.ring), total)

    def protocol_bytes(self, rnd: int, participants: tuple[int, ...], survivors: list[int]) -> int:
        """What the protocol's messages beyond the masked uploads weigh this round: two advertised keys per
        participant and their copies to its neighbours, two shares to each holder (sent and delivered through the
        server), and the shares survivors hand in for unmasking."""
        graph = self.graph(rnd, participants)
        total = 0
        for u in participants:
            deg = len(graph[u])
            total += 2 * KEY_BYTES * (1 + deg) + 2 * 2 * SHARE_BYTES * deg
        alive = set(survivors)
        for u in participants:  # a survivor hands in, for each of its holders' secrets, one share
            total += SHARE_BYTES * sum(1 for h in self.holders(rnd, participants, u) if h in alive)
        return total


@functools.lru_cache(maxsize=64)
def _graph(seed: int, degree: int, rnd: int, participants: tuple[int, ...]) -> dict[int, list[int]]:
    return harary_neighbours(list(participants), degree, seed, rnd)


@functools.lru_cache(maxsize=4096)
def _public_key(private: bytes) -> bytes:
    from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey

    return X25519PrivateKey.from_private_bytes(private).public_key().public_bytes_raw()


def tolerated_dropouts(args: SecureAggregationArgs, clients_per_round: int) -> int:
    """The threshold in force: ``--secure_aggregation.threshold``, or the largest for which a majority of each
    secret's holders must report (a smaller majority would let the server collect both secrets of one client).

    Raises:
        ValueError: a threshold larger than that, naming the flag.
    """
    holders = clients_per_round if args.neighbors == 0 else min(args.neighbors + 1, clients_per_round)
    safe = (holders - 1) // 2
    if args.threshold is None:
        return safe
    if args.threshold > safe:
        raise ValueError(f"--secure_aggregation.threshold must be at most {safe} with {holders} holders per secret "
                         f"({clients_per_round} clients per round), so that a majority of holders must report; got "
                         f"{args.threshold}")
    return args.threshold


# -- the wrapper ----------------------------------------------------------------------------------------------------
def _clear_keys() -> tuple[str, ...]:
    """Uploaded tensors that are public metadata and cross unmasked (DP-SGD's step count and noise)."""
    from fedhb.privacy.dpsgd import ACCOUNT

    return (ACCOUNT,)


class SecureAggregation(Algorithm):
    """Secure aggregation around ``inner`` (an averaging algorithm, possibly wrapped in :class:`ClientDP`).

    Args:
        inner: The wrapped algorithm.
        args: ``--secure_aggregation.*``.
        seed: The run seed.
        fraction: ``--federation.fraction`` (the round's participants are the selected clients).
    """

    def __init__(self, inner: Algorithm, args: SecureAggregationArgs, *, seed: int, fraction: float = 1.0) -> None:
        self.inner, self.args, self.seed, self.fraction = inner, args, seed, fraction
        core = inner
        while isinstance(getattr(core, "inner", None), Algorithm):
            core = core.inner  # type: ignore[attr-defined]
        step = server_step(core, "--secure_aggregation.enabled")
        if step.kind != "mean":
            raise ValueError(f"--secure_aggregation.enabled cannot wrap {type(core).__name__}: its server step mixes "
                             "each client's own upload (it needs every B matrix), which secure aggregation hides")
        if isinstance(inner, ClientDP) and inner.privacy.adaptive_clip:
            raise ValueError("--privacy.adaptive_clip does not work with --secure_aggregation.enabled yet: its count "
                             "of unclipped clients would need its own fixed-point range")
        distributed = isinstance(inner, ClientDP) and inner.placement == "distributed"
        self.uniform = step.weights == "uniform" or distributed
        self.protocol: Protocol | None = None
        # What the loop asks of the algorithm, as the wrapped one answers it.
        self.has_global_model = inner.has_global_model
        self.pools_training_data = inner.pools_training_data

    def hparams(self) -> dict[str, Any]:
        return self.inner.hparams()

    @property
    def clients_per_round(self) -> int:
        n = self.num_clients or 1
        return n if self.fraction >= 1 else max(1, int(round(self.fraction * n)))

    def participants(self, rnd: int) -> tuple[int, ...]:
        from fedhb.loop import select_clients

        return tuple(select_clients(self.seed, rnd, self.num_clients or 1, self.fraction))

    def setup(self, names: list[str], initial: State | None = None, num_clients: int | None = None) -> None:
        super().setup(names, initial, num_clients)
        self.inner.setup(names, initial, num_clients)
        if initial is None:
            raise ValueError("secure aggregation needs the initial model in setup()")
        k = self.clients_per_round
        weight_sum = k * (1 if self.uniform else self.args.max_weight)
        ring = ring_bits(self.args.bits, weight_sum)
        if ring > 52:  # the collectives carry the ring's integers exactly only below 2^53 (float64)
            raise ValueError(f"--secure_aggregation.bits {self.args.bits} with {k} clients per round of weight up to "
                             f"{self.args.max_weight} needs a {ring}-bit ring, more than 52; lower the bits or "
                             "--secure_aggregation.max_weight")
        self.protocol = Protocol(self.seed, tolerated_dropouts(self.args, k), self.args.neighbors, ring)
        self.carrier = torch.int32 if ring <= 31 else torch.int64
        template = self.inner.init_client_state({k: v.clone() for k, v in initial.items()}, 0)
        clear = set(_clear_keys())
        self.layout: Layout = [(k, v.shape, v.dtype) for k, v in self.inner.upload(template).items() if k not in clear]
        self.width = sum(math.prod(shape) for _, shape, _ in self.layout)
        # What every client received last (an averaging server sends all the same): updates are taken against it.
        self._base: State = {k: initial[k].clone() for k, _, _ in self.layout if not k.startswith(ALGO_PREFIX)}

    def init_client_state(self, state: State, client: int) -> State:
        state = self.inner.init_client_state(state, client)
        state[MASKED] = torch.zeros(self.width, dtype=self.carrier)
        state[ROUND] = torch.zeros((), dtype=torch.int64)
        return state

    def personalized_model(self, state: State) -> State:
        return self.inner.personalized_model(state)

    def global_state(self) -> State | None:
        return self.inner.global_state()

    # -- the client ----------------------------------------------------------------------------------------------------
    def weight(self, num_samples: int) -> int:
        return 1 if self.uniform else max(1, min(num_samples, self.args.max_weight))

    def flatten_update(self, after: Mapping[str, Tensor], start: Mapping[str, Tensor]) -> Tensor:
        parts = []
        for k, _, _ in self.layout:
            value = after[k].detach().cpu().to(torch.float64)
            if not k.startswith(ALGO_PREFIX):
                value = value - start[k].detach().cpu().to(torch.float64)
            parts.append(value.reshape(-1))
        return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64)

    def local_update(self, trainer: LocalTrainer, state: State) -> None:
        assert self.protocol is not None
        start = {k: state[k].clone() for k, _, _ in self.layout if not k.startswith(ALGO_PREFIX)}
        self.inner.local_update(trainer, state)
        after = self.inner.upload({**state, **{k: v.cpu() for k, v in trainer.read().items()}})
        values = quantize(self.flatten_update(after, start), self.args.clip_range, self.args.bits)
        values = values * self.weight(trainer.num_samples)
        masked = self.protocol.mask(trainer.round, self.participants(trainer.round), trainer.client, values)
        state[MASKED] = masked.to(self.carrier)
        state[ROUND] = torch.tensor(trainer.round, dtype=torch.int64)

    def upload(self, state: State) -> State:
        clear = set(_clear_keys())
        public = {k: v for k, v in self.inner.upload(state).items() if k in clear}
        return {MASKED: state[MASKED], ROUND: state[ROUND], **public}

    # -- the server ----------------------------------------------------------------------------------------------------
    def aggregate(self, uploads: dict[int, State], num_samples: dict[int, int]) -> Aggregate:
        assert self.protocol is not None
        started = time.perf_counter()
        ids = sorted(uploads)
        rounds = {int(uploads[i][ROUND]) for i in ids}
        if len(rounds) != 1:
            raise RuntimeError(f"secure aggregation: uploads from several rounds {sorted(rounds)}")
        rnd = rounds.pop()
        participants = self.participants(rnd)
        if not set(ids) <= set(participants):
            raise RuntimeError(f"secure aggregation: round {rnd}: uploads from clients that were not selected "
                               f"{sorted(set(ids) - set(participants))}")
        total = self.protocol.unmask(rnd, participants, {i: uploads[i][MASKED] for i in ids})
        weights = {i: self.weight(num_samples[i]) for i in ids}
        mean = dequantize(total, self.args.clip_range, self.args.bits) / sum(weights.values())
        same: State = {}
        offset = 0
        for k, shape, dtype in self.layout:
            n = math.prod(shape)
            delta = mean[offset:offset + n].view(shape)
            offset += n
            base = self._base[k].to(torch.float64) if k in self._base else 0.0
            same[k] = (base + delta).to(dtype)
        clear = set(_clear_keys())
        synthetic = {i: {**same, **{k: v for k, v in uploads[i].items() if k in clear}} for i in ids}
        elapsed = time.perf_counter() - started
        result = Aggregate.of(self.inner.aggregate(synthetic, weights))
        if result.received:
            first = result.received[ids[0]]
            for k in self._base:
                if k in first:
                    self._base[k] = first[k].detach().cpu().clone()
        metrics = {"secagg_bytes": float(self.protocol.protocol_bytes(rnd, participants, ids)),
                   "secagg_time_s": elapsed}
        return dataclasses.replace(result, metrics={**result.metrics, **metrics})

    def state_dict(self) -> dict[str, Any]:
        return {"inner": self.inner.state_dict(), "base": self._base}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.inner.load_state_dict(state["inner"])
        self._base = {k: v.clone() for k, v in state["base"].items()}
