"""HetLoRA: hand-computed zero-padded sparsity-weighted aggregation, rank self-pruning, properties on a federation,
and FederatedLLM's zero-padding aggregation re-derived."""

from __future__ import annotations

import pytest
import torch
from algo_testkit import toy_trainer

from fedhb.algorithms import FedAvg, HetLoRA
from fedhb.algorithms._ops import state_bytes
from fedhb.models.lora import RANK_KEY

A, B, HEAD = "enc.q.lora_A.default.weight", "enc.q.lora_B.default.weight", "head.1.weight"


def m(*rows):
    return torch.tensor(rows, dtype=torch.float32)


def _setup(algo, rank=2, clients=2):
    algo.setup([A, B, HEAD], {A: torch.zeros(rank, 2), B: torch.zeros(2, rank), HEAD: m([0.0])}, clients)
    return algo


def test_hetlora_zero_pads_and_weights_each_client_by_its_update_norm():
    # Prepare: a rank-2 model; client 0 of rank 2 with B_0 A_0 = I, client 1 of rank 1 with B_1 A_1 = [[2, 2], [0, 0]].
    algo = _setup(HetLoRA(ranks=[2, 1]))
    states = {c: algo.init_client_state({A: torch.zeros(2, 2), B: torch.zeros(2, 2), HEAD: m([0.0])}, c)
              for c in (0, 1)}
    states[0].update({A: m([1.0, 0.0], [0.0, 1.0]), B: m([1.0, 0.0], [0.0, 1.0]), HEAD: m([2.0])})
    states[1].update({A: m([1.0, 1.0], [0.0, 0.0]), B: m([2.0, 0.0], [0.0, 0.0]), HEAD: m([6.0])})

    # Execute
    uploads = {c: algo.upload(s) for c, s in states.items()}
    received = algo.aggregate(uploads, {0: 1, 1: 3})

    # Assert: client 1 sends its rank-1 factors (and its rank); the norms are ||I|| = sqrt(2) and sqrt(8) = 2 sqrt(2):
    # weights 1/3 and 2/3. A = 1/3 I + 2/3 [[1, 1], [0, 0]] (padded), B = 1/3 I + 2/3 [[2, 0], [0, 0]].
    assert uploads[1][A].shape == (1, 2) and uploads[1][B].shape == (2, 1) and int(uploads[1][RANK_KEY]) == 1
    glob = algo.global_state()
    torch.testing.assert_close(glob[A], m([1.0, 2 / 3], [0.0, 1 / 3]), rtol=0, atol=1e-7)
    torch.testing.assert_close(glob[B], m([5 / 3, 0.0], [0.0, 1 / 3]), rtol=0, atol=1e-7)
    assert torch.equal(glob[HEAD], m([5.0]))  # the head: sample-weighted, 0.25 * 2 + 0.75 * 6
    # Client 1 receives the global adapter cut to its rank, and downloads only those components and the head.
    assert torch.equal(received[1][A][1], torch.zeros(2)) and torch.equal(received[1][B][:, 1], torch.zeros(2))
    assert torch.equal(received[1][A][0], glob[A][0]) and torch.equal(received[1][HEAD], m([5.0]))
    assert received.bytes_down == {0: state_bytes(glob), 1: (2 + 2 + 1) * 4}


def test_hetlora_prunes_a_tail_that_shrank_since_the_last_round():
    # Prepare: rank 2, gamma 0.5 (the tail is component 1), lam 1; the tail's norm was 10 after the previous round.
    algo = _setup(HetLoRA(gamma=0.5, lam=1.0))
    state = algo.init_client_state({A: torch.zeros(2, 2), B: torch.zeros(2, 2), HEAD: m([0.0])}, 0)
    state["algo/hetlora/tail"] = torch.tensor(10.0, dtype=torch.float64)
    start = {A: m([1.0, 0.0], [0.0, 1.0]), B: m([1.0, 0.0], [0.0, 1.0]), HEAD: m([0.0])}
    trainer, _ = toy_trainer({k: v.tolist() for k, v in start.items()}, [0.0])

    # Execute
    algo.local_update(trainer, state)

    # Assert: the tail (||A[1]|| ||B[:, 1]|| < 10) shrank: the client drops to rank 1 and zeroes component 1.
    assert int(state[RANK_KEY]) == 1 and float(state["algo/hetlora/tail"]) == -1.0
    assert not trainer.read()[A][1].any() and not trainer.read()[B][:, 1].any()
    assert trainer.read()[A][0].any()
    # A client without a previous norm keeps its rank and remembers the norm.
    fresh = algo.init_client_state({A: torch.zeros(2, 2), B: torch.zeros(2, 2), HEAD: m([0.0])}, 0)
    trainer, _ = toy_trainer({k: v.tolist() for k, v in start.items()}, [0.0])
    algo.local_update(trainer, fresh)
    assert int(fresh[RANK_KEY]) == 2 and float(fresh["algo/hetlora/tail"]) > 0
    with pytest.raises(ValueError, match="--algorithm.weighting"):
        HetLoRA(weighting="norm")


def test_hetlora_with_one_rank_sample_weights_and_no_pruning_is_fedavg(make_loop):
    het = make_loop(HetLoRA(lam=0.0, weighting="samples"), clients=3)
    avg = make_loop(FedAvg(), clients=3)

    for rnd in (1, 2):
        het.run_round(rnd)
        avg.run_round(rnd)

    glob, ref = het.algorithm.global_state(), avg.algorithm.global_state()
    for k in ref:
        torch.testing.assert_close(glob[k], ref[k], rtol=0, atol=1e-6, msg=k)


def test_hetlora_clients_of_lower_rank_upload_less_and_stay_at_their_rank(make_loop):
    loop = make_loop(HetLoRA(ranks=[8, 2], lam=0.0), clients=3)

    first = loop.run_round(1)

    for c, state in loop.states.items():
        rank = int(state[RANK_KEY])
        assert rank == (8, 2)[c % 2]
        for k, v in state.items():
            if ".lora_A." in k:
                assert not v[rank:].any()
    full = make_loop(HetLoRA(lam=0.0), clients=3).run_round(1)
    assert first.bytes_up < full.bytes_up


def test_hetlora_with_sample_weights_is_federatedllms_zero_padding():
    """ATP-1010/FederatedLLM (commit 7bea158) ``fed_utils/model_aggregation.py::FedAvg`` with ``stacking=False,
    zero_padding=True``: each client's ``lora_A`` (``shape[0] == local_rank``) padded with ``ZeroPad2d((0, 0, 0,
    max - r))``, ``lora_B`` with ``ZeroPad2d((0, max - r, 0, 0))``, both times the client's normalised sample
    weight, summed."""
    gen = torch.Generator().manual_seed(0)
    ranks, sizes = [4, 2, 1], {0: 5, 1: 2, 2: 9}
    algo = HetLoRA(ranks=ranks, weighting="samples")
    algo.setup([A, B, HEAD], {A: torch.zeros(4, 3), B: torch.zeros(5, 4), HEAD: torch.zeros(2)}, 3)
    uploads = {c: {A: torch.randn(r, 3, generator=gen), B: torch.randn(5, r, generator=gen),
                   HEAD: torch.randn(2, generator=gen), RANK_KEY: torch.tensor(r)} for c, r in enumerate(ranks)}

    algo.aggregate(uploads, sizes)

    weights_array = torch.nn.functional.normalize(torch.tensor([5.0, 2.0, 9.0]), p=1, dim=0)
    weighted = {}
    for k, client_id in enumerate(range(3)):
        r = ranks[client_id]
        for key in (A, B):
            w = uploads[client_id][key]
            if w.shape[0] == r and key == A:
                pad = torch.nn.ZeroPad2d(padding=(0, 0, 0, 4 - r))
            else:
                pad = torch.nn.ZeroPad2d(padding=(0, 4 - r, 0, 0))
            weighted[key] = weighted.get(key, 0) + pad(w) * weights_array[k]
    for key in (A, B):
        torch.testing.assert_close(algo.global_state()[key], weighted[key], rtol=0, atol=1e-6)
