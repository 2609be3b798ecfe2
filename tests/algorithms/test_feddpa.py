"""FedDPA: hand-computed local and global phases and server step, a property on a federation, and the released code's
training and test-time weighting re-derived."""

from __future__ import annotations

import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms import FedDPA, Local
from fedhb.algorithms._ops import weighted_average
from fedhb.config import OptimArgs

A, W = "enc.q.lora_A.default.weight", "head.1.weight"
LOCAL, WEIGHT = "algo/feddpa/local/" + A, "algo/feddpa/weight"


def _setup(algo, clients=3):
    algo.setup([A, W], {A: t(0.0), W: t(0.0)}, clients)
    return algo


def test_feddpa_round_two_trains_the_personal_adapter_through_the_mix_then_the_global_one():
    # Prepare: received global adapter 0 and head 0, personal adapter 4, data mean 1, lr 0.5, a = 0.5, round 2.
    algo = _setup(FedDPA(local_weight=0.5, max_weight=0.5))
    state = algo.init_client_state({A: t(0.0), W: t(0.0)}, 0)
    state[LOCAL] = t(4.0)
    trainer, _ = toy_trainer({A: [0.0], W: [0.0]}, [1.0], rnd=2)

    # Execute
    algo.local_update(trainer, state)

    # Assert: the mix 0.5 * 4 + 0.5 * 0 = 2 has gradient 1; the personal adapter's SGD step on 0.5 * 1 gives
    # 4 - 0.5 * 0.5 = 3.75. Then the global adapter and head train alone: 0 -> 0.5 each. One sample: weight 0.5.
    assert torch.equal(state[LOCAL], t(3.75))
    assert torch.equal(trainer.read()[A], t(0.5)) and torch.equal(trainer.read()[W], t(0.5))
    assert float(state[WEIGHT]) == 0.5
    personal = algo.personalized_model({**state, A: t(0.5), W: t(0.5)})
    assert torch.equal(personal[A], t(0.5 * 0.5 + 0.5 * 3.75)) and torch.equal(personal[W], t(0.5))


def test_feddpa_round_one_has_no_personal_phase_and_the_server_weighs_clients_equally():
    algo = _setup(FedDPA())
    state = algo.init_client_state({A: t(0.0), W: t(0.0)}, 0)
    trainer, _ = toy_trainer({A: [0.0], W: [0.0]}, [1.0], rnd=1)

    algo.local_update(trainer, state)
    received = algo.aggregate({0: {A: t(1.0), W: t(0.0)}, 2: {A: t(4.0), W: t(2.0)}}, {0: 1, 2: 9})

    assert torch.equal(state[LOCAL], t(0.0)) and torch.equal(trainer.read()[A], t(0.5))
    assert torch.equal(received[0][A], t(2.5)) and torch.equal(received[2][W], t(1.0))  # the code's FedAvg: 1 / N


def test_feddpa_first_round_is_uniform_fedavg_and_keeps_the_personal_adapters(make_loop):
    dpa, local = make_loop(FedDPA(), clients=3), make_loop(Local(), clients=3)
    start = dpa.client_module.get_state()

    dpa.run_round(1)
    local.run_round(1)

    trained = {c: {k: s[k] for k in local.model_names} for c, s in local.states.items()}
    uniform = weighted_average(list(trained.values()), [1.0] * 3)
    glob = dpa.algorithm.global_state()
    for k in uniform:
        torch.testing.assert_close(glob[k], uniform[k], rtol=0, atol=1e-6)
    for state in dpa.states.values():
        assert all(torch.equal(state["algo/feddpa/local/" + k], start[k]) for k in dpa.model_names if ".lora_" in k)
        assert 0 <= float(state["algo/feddpa/weight"]) <= 0.5


def test_feddpa_is_the_released_code_with_parameter_wise_mixing():
    """Lydia-yang/FedDPA (commit cf638c11ecf931b2a3be841d3062912b855f3a8d): ``code/main.py`` (from round 2:
    ``set_local(epoch, a=local_weight)``, train the ``local`` adapter, then train ``default``), ``code/peft/tuners/
    lora/layer.py::forward`` (the other adapter's output detached, times ``adapter_weight``; here the mix is
    parameter-wise), ``GlobalModel_generated.py::get_weight`` (``w * mean cos(emb(test), emb(train_i))`` over
    ``instance_num`` training samples, under the local adapter)."""
    data = [1.0, -2.0, 3.0, 0.5, 2.5]
    optim = OptimArgs(name="sgd", lr=0.1, momentum=0.9, schedule="constant", min_lr=0.0)
    algo = _setup(FedDPA(local_weight=0.3, max_weight=0.5, instances=3))
    state = algo.init_client_state({A: t(0.5, -1.0), W: t(2.0, 0.0)}, 0)
    state[LOCAL] = t(1.0, 1.0)
    trainer, _ = toy_trainer({A: [0.5, -1.0], W: [2.0, 0.0]}, data, lr=0.1, epochs=1, batch_size=2, rnd=3,
                             optim=optim)
    twin, _ = toy_trainer({W: [0.0]}, data, epochs=2, batch_size=2)
    order = [b["x"] for _, b in twin.batches(2)]
    similarity = algo.similarity
    seen = {}

    def recording(trainer_, local):
        seen["state"] = trainer_.order.get_state()
        return similarity(trainer_, local)

    algo.similarity = recording

    # Execute
    algo.local_update(trainer, state)

    # Assert: the personal adapter trained through a * local + (1 - a) * global.detach() with SGD(momentum 0.9) ...
    local, glob = torch.nn.Parameter(t(1.0, 1.0)), t(0.5, -1.0)
    optimizer = torch.optim.SGD([local], lr=0.1, momentum=0.9)
    for x in order[:3]:
        optimizer.zero_grad()
        mixed = 0.3 * local + 0.7 * glob
        (0.5 * (mixed[None, :] - x[:, None]).pow(2).sum(1).mean() + 0.5 * (t(2.0, 0.0)[None, :] - x[:, None])
         .pow(2).sum(1).mean()).backward()
        optimizer.step()
    torch.testing.assert_close(state[LOCAL], local.detach(), rtol=0, atol=1e-6)
    # ... then the global adapter and head alone ...
    params = [torch.nn.Parameter(t(0.5, -1.0)), torch.nn.Parameter(t(2.0, 0.0))]
    optimizer = torch.optim.SGD(params, lr=0.1, momentum=0.9)
    for x in order[3:]:
        optimizer.zero_grad()
        sum(0.5 * (p[None, :] - x[:, None]).pow(2).sum(1).mean() for p in params).backward()
        optimizer.step()
    torch.testing.assert_close(trainer.read()[A], params[0].detach(), rtol=0, atol=1e-6)
    # ... and the weight: 0.5 times the mean cosine similarity under the personal adapter (toy features x * A).
    z = torch.tensor(data)[:, None] * local.detach()[None, :]
    gen = torch.Generator()
    gen.set_state(seen["state"])
    picks = torch.randperm(5, generator=gen)[:3]
    sims = [float(torch.nn.functional.cosine_similarity(z[i], z[j], dim=0)) for i in range(5) for j in picks.tolist()
            if i != j]
    assert abs(float(state[WEIGHT]) - 0.5 * sum(sims) / len(sims)) < 1e-6
