"""Every random stream of a run, derived from the run seed and named here.

Each stream is ``numpy.random.SeedSequence([seed, ...])`` over a fixed tuple: its name's tag and the counters that
make it unique (round, client, attempt). None depends on the process's rank, so a federation draws the same numbers on
any number of processes. The tags are those of earlier releases, so that a run's numbers stay what they were; where a
tag shares a position with a counter (the client-selection tag 7 and client 7's training seed both sit after
``(seed, round)``), the two feed different generators (numpy's PCG64 for selection, torch's Mersenne Twister for
training), which is why they were left as they are.
"""

from __future__ import annotations

from enum import IntEnum

import numpy as np


class Stream(IntEnum):
    """Tags that tell the streams apart."""

    SUBSAMPLE = 101  # --data.fraction: which samples are kept        [seed, 101]
    PARTITION = 202  # which client each sample goes to                 [seed, 202]
    SPLIT = 303  # each client's train/val/test split                   [seed, 303, client]
    SELECTION = 7  # the clients that train in a round                  [seed, round, 7]
    DROPOUT = 11  # the clients that fail to report (--federation.dropout) [seed, round, attempt, 11]
    LORA_REDRAW = 404  # FLoRA's fresh LoRA A after each aggregation     [run key, round, 404, layer]
    MISSING = 505  # which clients or samples lose a modality (--partition.missing_modality) [seed, 505(, client)]
    DP_NOISE = 505  # client-level DP's Gaussian noise on the mean       [seed, round, 505]
    DP_CLIENT_NOISE = 506  # noise a client adds itself (EPFL, distributed) [seed, round, client, 506]
    SECAGG = 606  # a client's secure-aggregation secrets (simulation) [seed, round, client, 606]
    DPSGD = 707  # DP-SGD's Poisson batches and gradient noise       [seed, round, client, 707]
    AUDIT = 808  # the membership-inference audit's reference models [seed, client, shadow, 808]
    PUBLIC = 909  # the server-held public samples (CreamFL's public_fraction) [seed, 909, client]


def rng(seed: int, *key: int) -> np.random.Generator:
    """A numpy generator for the stream ``(seed, *key)``."""
    return np.random.default_rng([seed, *key])


def derive(seed: int, *key: int) -> int:
    """A 32-bit seed for the stream ``(seed, *key)`` (for torch generators)."""
    return int(np.random.SeedSequence([seed, *key]).generate_state(1)[0])


def client_seed(seed: int, rnd: int, client: int) -> int:
    """Client ``client``'s seed in round ``rnd``: its data order and dropout masks."""
    return derive(seed, rnd, client)
