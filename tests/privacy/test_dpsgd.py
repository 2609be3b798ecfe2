"""Sample-level DP-SGD: opacus' per-sample gradients through the one backbone's LoRA are the per-example gradients;
the step is the clipped, noised sum over the expected batch; each client's ε is the accountant's for its own sampling
rate and steps; what reads the data outside DP-SGD is refused."""

from __future__ import annotations

import math

import pytest
import torch

from fedhb.algorithms import EPFL, MOON, FedAvg, FedProx
from fedhb.algorithms.trainer import LocalTrainer
from fedhb.client import lr_at
from fedhb.config import PrivacyArgs
from fedhb.privacy.accounting import epsilon
from fedhb.privacy.dpsgd import PrivateTrainer, SampleDP, steps_per_epoch


def trainer_for(loop, client: int = 0) -> LocalTrainer:
    loop.load(loop.states[client])
    return LocalTrainer(loop.fabric, loop.module, loop.client_module, loop.optimizer, loop.tensors,
                        loop.splits[client].train, epochs=1, batch_size=8, eval_batch_size=64,
                        lr=lr_at(loop.optim, 1, 1), optim=loop.optim, seed=0, round=1, rounds=1, client=client)


def test_the_private_gradient_is_the_clipped_sum_of_per_example_gradients_over_the_expected_batch(make_loop):
    loop = make_loop(FedAvg(), clients=2)
    trainer = trainer_for(loop)
    rows = torch.arange(6)
    samples = torch.from_numpy(trainer.index[rows.numpy()])
    batch = {k: v[samples] for k, v in trainer.tensors.items()}
    params = trainer.params
    loop.module.train()
    # Prepare: each example's gradient by its own backward pass.
    per_example = []
    for i in range(6):
        loss = loop.module.training_step({k: v[i:i + 1] for k, v in batch.items()})["loss"]
        grads = torch.autograd.grad(loss, list(params.values()))
        per_example.append({n: g for n, g in zip(params, grads)})
    norms = [math.sqrt(sum(float(g.pow(2).sum()) for g in e.values())) for e in per_example]
    clip = sorted(norms)[2]  # clips half of them
    rate = 0.25
    expected = {n: sum(min(1.0, clip / nm) * e[n] for e, nm in zip(per_example, norms)) / (rate * len(trainer.index))
                for n in params}

    # Execute: one private step without noise, with the gradients it sets captured before the optimizer step.
    private = PrivateTrainer(trainer, clip, 0.0, rate, seed=0)
    seen = {}
    with private.hooks():
        trainer.step(batch, rows, before_step=lambda ps: (private._privatize(ps, 6, None),
                                                           seen.update({n: p.grad.clone() for n, p in ps.items()})))

    for n in params:
        assert torch.allclose(seen[n], expected[n], atol=1e-6, rtol=1e-4), n
    assert all(not hasattr(p, "grad_sample") for p in params.values())  # the hooks left with the round


def test_noise_has_std_sigma_clip_over_the_expected_batch(make_loop):
    loop = make_loop(FedAvg(), clients=2)
    trainer = trainer_for(loop)
    private = PrivateTrainer(trainer, clip=1e-9, noise_multiplier=3.0, rate=0.5, seed=1)
    rows = torch.arange(4)
    batch = {k: v[torch.from_numpy(trainer.index[:4])] for k, v in trainer.tensors.items()}
    seen = {}
    with private.hooks():
        trainer.step(batch, rows, before_step=lambda ps: (private._privatize(ps, 4, None),
                                                           seen.update({n: p.grad.clone() for n, p in ps.items()})))

    flat = torch.cat([g.flatten() for g in seen.values()])
    assert float(flat.std()) == pytest.approx(3.0 * 1e-9 / (0.5 * len(trainer.index)), rel=0.05)


def test_each_clients_epsilon_is_the_accountants_for_its_own_rate_and_steps(make_loop):
    privacy = PrivacyArgs(mode="sample", clip=1.0, noise_multiplier=1.2)
    algo = SampleDP(EPFL(lam=0.5), privacy, seed=0, rounds=2, fraction=1.0, batch_size=32, local_epochs=1)
    loop = make_loop(algo, clients=3)

    for r in (1, 2):
        loop.run_round(r)

    eps = algo.epsilons()
    for c, n in enumerate(loop.num_train):
        steps = 2 * steps_per_epoch(n, 32)
        assert int(algo._steps[c]) == steps
        assert eps[c] == pytest.approx(epsilon([(1.2, min(1.0, 32 / n), steps)], 1e-5))
    assert loop.server_metrics["epsilon"] == pytest.approx(max(eps))
    assert loop.server_metrics["epsilon_mean"] == pytest.approx(sum(eps) / 3)


def test_a_target_epsilon_is_reached_by_every_client_without_overspending(make_loop):
    privacy = PrivacyArgs(mode="sample", clip=1.0, target_epsilon=2.0)
    algo = SampleDP(FedProx(mu=0.01), privacy, seed=0, rounds=2, fraction=1.0, batch_size=16, local_epochs=1)
    loop = make_loop(algo, clients=3, batch_size=16)

    for r in (1, 2):
        loop.run_round(r)

    for e in algo.epsilons():
        assert 2.0 * 0.98 <= e <= 2.0


def test_a_local_update_that_reads_the_data_outside_dp_sgd_is_refused(make_loop):
    algo = SampleDP(MOON(), PrivacyArgs(mode="sample", noise_multiplier=1.0), seed=0, rounds=1, fraction=1.0,
                    batch_size=32, local_epochs=1)
    loop = make_loop(algo, clients=2)

    with pytest.raises(ValueError, match=r"trainer\.features\(\), which reads the client's data outside DP-SGD"):
        loop.run_round(1)


def test_without_noise_or_clipping_on_full_batches_it_is_plain_full_batch_training_prox_term_included(make_loop):
    privacy = PrivacyArgs(mode="sample", clip=1e9, noise_multiplier=0.0)
    plain = make_loop(FedProx(mu=0.5), clients=2, batch_size=10_000, local_epochs=3)
    private = make_loop(SampleDP(FedProx(mu=0.5), privacy, seed=0, rounds=2, fraction=1.0, batch_size=10_000,
                                 local_epochs=3), clients=2, batch_size=10_000, local_epochs=3)

    for r in (1, 2):
        plain.run_round(r)
        private.run_round(r)

    for c, state in plain.states.items():
        for k, v in state.items():
            assert torch.allclose(v, private.states[c][k], atol=1e-6, rtol=1e-5), (c, k)
    assert private.algorithm.epsilons() == [math.inf, math.inf]


def test_the_ledger_of_every_client_survives_a_checkpoint():
    privacy = PrivacyArgs(mode="sample", clip=1.0, noise_multiplier=1.1)
    make = lambda: SampleDP(FedAvg(), privacy, seed=0, rounds=5, fraction=1.0, batch_size=8,  # noqa: E731
                            local_epochs=1)
    algo, again = make(), make()
    for a in (algo, again):
        a.setup(["w"], {"w": torch.zeros(2)}, num_clients=3)
    account = lambda steps: torch.tensor([float(steps), 1.1], dtype=torch.float64)  # noqa: E731
    from fedhb.privacy.dpsgd import ACCOUNT

    algo.aggregate({0: {"w": torch.zeros(2), ACCOUNT: account(4)}, 2: {"w": torch.ones(2), ACCOUNT: account(9)}},
                   {0: 32, 2: 72})
    again.load_state_dict(algo.state_dict())

    assert again.epsilons() == algo.epsilons()
    assert algo.epsilons()[1] == 0.0  # client 1 released nothing
    assert algo.epsilons()[2] == pytest.approx(epsilon([(1.1, 8 / 72, 9)], 1e-5))


def test_dp_sgd_is_refused_under_the_fp16_loss_scale(organamnist_root, tmp_path):
    from fedhb.config import FabricArgs, PrivacyArgs
    from fedhb.data import MedMNIST
    from fedhb.fit import fit

    with pytest.raises(ValueError, match=r"--privacy.mode sample cannot run with --fabric.precision 16-mixed"):
        fit(data=MedMNIST(root=organamnist_root), out_dir=str(tmp_path / "r"),
            privacy=PrivacyArgs(mode="sample", noise_multiplier=1.0, clip=1.0),
            fabric=FabricArgs(accelerator="cpu", precision="16-mixed"))
    assert not (tmp_path / "r").exists()  # refused before anything was written
