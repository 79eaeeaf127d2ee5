"""Stage-2 losses: the erase target's sign and stop-gradient, the gate loss."""

import math

import pytest
import torch

from ace_lightning.method.losses import erase_loss, erase_target, gate_loss, preserve_loss


def test_erase_target_sign():
    eps_tgt, eps_neu = torch.full((1, 4), 3.0), torch.full((1, 4), 1.0)
    # eta = 0: the neutral prediction; eta = 1: pushed *away* from the concept, past the neutral (ESD)
    assert torch.equal(erase_target(eps_tgt, eps_neu, 0.0), eps_neu)
    assert torch.equal(erase_target(eps_tgt, eps_neu, 1.0), torch.full((1, 4), -1.0))  # 1 - (3 - 1)
    assert torch.equal(erase_target(eps_tgt, eps_neu, 0.5), torch.full((1, 4), 0.0))


def test_erase_loss_stops_gradient_at_the_target():
    pred = torch.zeros(2, 3, requires_grad=True)
    eps_tgt = torch.ones(2, 3, requires_grad=True)
    eps_neu = torch.zeros(2, 3, requires_grad=True)
    loss = erase_loss(pred, eps_tgt, eps_neu, eta=1.0)  # target = 0 - (1 - 0) = -1
    assert float(loss) == pytest.approx(1.0)
    loss.backward()
    assert eps_tgt.grad is None and eps_neu.grad is None  # the frozen predictions get no gradient
    assert torch.allclose(pred.grad, torch.full((2, 3), 2.0 / 6))  # d/dpred mean((pred + 1)^2)
    p2 = torch.zeros(2, 3, requires_grad=True)
    frozen = torch.ones(2, 3, requires_grad=True)
    preserve_loss(p2, frozen).backward()
    assert frozen.grad is None and torch.allclose(p2.grad, torch.full((2, 3), -2.0 / 6))


def test_gate_loss_values_and_direction():
    g_t, g_p = torch.tensor([0.9, 0.8]), torch.tensor([0.1, 0.3])
    want = -(math.log(0.9) + math.log(0.8)) / 2 - (math.log(0.9) + math.log(0.7)) / 2
    assert float(gate_loss(g_t, g_p)) == pytest.approx(want, rel=1e-6)
    # the gradient opens the gate on targets and shuts it on preserves
    t = torch.tensor([0.5, 0.5], requires_grad=True)
    p = torch.tensor([0.5, 0.5], requires_grad=True)
    gate_loss(t, p).backward()
    assert (t.grad < 0).all() and (p.grad > 0).all()
    assert math.isfinite(float(gate_loss(torch.tensor([1.0]), torch.tensor([0.0]))))  # clamped, never inf
