"""``LocalTrainer``: the operations algorithms compose, on the toy model whose updates are known by hand."""

from __future__ import annotations

import pytest
import torch
from algo_testkit import t, toy_trainer

from fedhb.algorithms.trainer import Diverged

A, HEAD = "enc.q.lora_A.default.weight", "head.1.weight"


def test_fit_runs_sgd_over_every_batch_and_reports_the_mean_loss():
    trainer, _ = toy_trainer({HEAD: [0.0]}, [2.0, 2.0, 2.0], batch_size=2, epochs=1)

    mean = trainer.fit()

    # Two batches: 0 -> 1 (loss 2), 1 -> 1.5 (loss 0.5).
    assert torch.equal(trainer.read()[HEAD], t(1.5))
    assert trainer.steps == 2 and mean == trainer.mean_loss == pytest.approx(1.25)


def test_fit_with_trainable_names_moves_only_those_and_restores_the_rest():
    trainer, module = toy_trainer({A: [0.0], HEAD: [0.0]}, [2.0])

    trainer.fit(trainable=[HEAD])

    assert torch.equal(trainer.read()[A], t(0.0)) and torch.equal(trainer.read()[HEAD], t(1.0))
    assert all(p.requires_grad for p in module.values)
    with pytest.raises(KeyError, match="trainable names the model does not have"):
        trainer.fit(trainable=["nope"])


def test_a_non_finite_loss_raises_and_leaves_every_tensor_trainable_again():
    trainer, module = toy_trainer({A: [0.0], HEAD: [0.0]}, [2.0])

    with pytest.raises(Diverged, match="non-finite loss at step 0"):
        trainer.fit(trainable=[HEAD], loss=lambda batch, out, rows: torch.tensor(float("inf")))

    assert all(p.requires_grad for p in module.values)
    assert torch.equal(trainer.read()[HEAD], t(0.0))


def test_gradients_do_not_step_and_can_leave_the_rng_alone():
    trainer, _ = toy_trainer({A: [1.0], HEAD: [3.0]}, [2.0, 4.0])
    _, batch = next(trainer.batches())
    before = torch.get_rng_state()

    grads = trainer.gradients(batch, names=[HEAD], record=False, keep_rng=True)

    assert grads == {HEAD: t(0.0)}  # 3 - mean(2, 4)
    assert torch.equal(torch.get_rng_state(), before)
    assert trainer.steps == 0 and torch.equal(trainer.read()[HEAD], t(3.0))


def test_batches_cover_a_fraction_of_each_epoch_in_a_seeded_order():
    trainer, _ = toy_trainer({HEAD: [0.0]}, [float(i) for i in range(10)], batch_size=3)
    again, _ = toy_trainer({HEAD: [0.0]}, [float(i) for i in range(10)], batch_size=3)

    rows = [r.tolist() for r, _ in trainer.batches(epochs=2, fraction=0.5)]
    same = [r.tolist() for r, _ in again.batches(epochs=2, fraction=0.5)]

    assert rows == same and [len(r) for r in rows] == [3, 2, 3, 2]
    first_epoch = rows[0] + rows[1]
    assert len(set(first_epoch)) == 5
    _, batch = next(trainer.batches(fraction=0.01))  # at least one sample
    assert len(batch["x"]) == 1


def test_features_are_in_split_order_without_gradients_under_given_tensors():
    trainer, module = toy_trainer({HEAD: [1.0, 2.0]}, [1.0, 3.0])
    module.train()

    z = trainer.features({HEAD: t(2.0, 0.0)})

    assert torch.equal(z, torch.tensor([[2.0, 0.0], [6.0, 0.0]]))
    assert not z.requires_grad and module.training
    assert torch.equal(trainer.read()[HEAD], t(2.0, 0.0))  # the given tensors stay loaded


def test_load_refuses_unknown_names_and_an_empty_split_reports_zero_loss():
    trainer, _ = toy_trainer({HEAD: [0.0]}, [])

    with pytest.raises(KeyError, match="tensors the model does not have"):
        trainer.load({"head.2.weight": t(1.0)})
    trainer.fit()
    assert trainer.steps == 0 and trainer.mean_loss == 0.0


class _Fp16Matmul(torch.nn.Module):
    """Loss ``1e-8 * sum(x w^T)`` through a matmul that autocast runs in fp16: without a loss scale its gradient
    ``1e-8 * sum(x)`` underflows in fp16's backward (smallest subnormal 6e-8)."""

    names = [HEAD]

    def __init__(self) -> None:
        super().__init__()
        self.w = torch.nn.Parameter(torch.tensor([0.5, 0.25]))

    def trainable(self):
        return {HEAD: self.w}

    def features(self, batch):
        return batch["x"][:, None] * self.w[None, :]

    def training_step(self, batch):
        out = batch["x"][:, None] @ self.w[None, :]
        return {"loss": (out.float() * 1e-8).sum(), "features": self.features(batch)}


def test_gradients_go_through_the_fp16_loss_scale_as_steps_do():
    # Issue #18, defect 5. Prepare: 16-mixed precision with a GradScaler of scale 2^16, as step() uses it.
    from lightning import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**16, growth_interval=10**6)
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer, _ = toy_trainer({}, [3.0, 5.0], fabric=fabric, module=_Fp16Matmul())
    _, batch = next(trainer.batches())

    # Execute
    grads = trainer.gradients(batch, record=False)

    # Assert: the true gradient 1e-8 * (3 + 5) for both entries (fp16 keeps ~3 digits); unscaled, it was 0.
    torch.testing.assert_close(grads[HEAD], torch.full((2,), 8e-8), rtol=2e-3, atol=0)
    assert scaler.get_scale() == 2.0**16


def test_gradients_skip_and_lower_the_scale_when_the_scaled_loss_overflows():
    from lightning import Fabric
    from lightning.fabric.plugins.precision import MixedPrecision

    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**40, growth_interval=10**6)  # 2^40 * 1e-8 > fp16's 65504
    fabric = Fabric(accelerator="cpu", devices=1, plugins=[MixedPrecision("16-mixed", "cpu", scaler=scaler)])
    trainer, _ = toy_trainer({}, [3.0, 5.0], fabric=fabric, module=_Fp16Matmul())
    _, batch = next(trainer.batches())

    grads = trainer.gradients(batch, record=False)

    assert torch.equal(grads[HEAD], torch.zeros(2)) and scaler.get_scale() == 2.0**39
