"""KL estimators and coefficient controllers (``lit_rlhf.rl.kl``) on numbers worked out by hand."""

import math

import pytest
import torch

from lit_rlhf.rl.kl import AdaptiveKL, FixedKL, kl_estimate, kl_k1, kl_k3

LN2 = math.log(2)


def close(actual, expected, tol=1e-4):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


def test_kl_estimators():
    logp, ref = torch.tensor([[math.log(0.5)]]), torch.tensor([[math.log(0.25)]])
    # k1 = ln 0.5 - ln 0.25 = ln 2; k3 with r = 0.25 / 0.5 = 0.5: (0.5 - 1) - ln 0.5 = ln 2 - 0.5
    close(kl_k1(logp, ref), [[LN2]])
    close(kl_k3(logp, ref), [[LN2 - 0.5]])
    close(kl_estimate(logp, ref, "k3"), [[LN2 - 0.5]])
    # k3 is never negative, k1 can be
    assert kl_k3(ref, logp).item() >= 0 and kl_k1(ref, logp).item() < 0
    with pytest.raises(ValueError, match="k1"):
        kl_estimate(logp, ref, "k2")


def test_fixed_and_adaptive_kl_controllers():
    fixed = FixedKL(0.3)
    fixed.update(100.0, 64)
    assert fixed.coef == 0.3
    ctrl = AdaptiveKL(init_coef=0.2, target=6.0, horizon=100)
    ctrl.update(9.0, 10)  # e = clip(9/6 - 1 = 0.5) = 0.2 -> 0.2 · (1 + 0.2 · 10/100) = 0.204
    close(ctrl.coef, 0.204, 1e-9)
    ctrl.update(3.0, 10)  # e = clip(-0.5) = -0.2 -> 0.204 · (1 - 0.02) = 0.19992
    close(ctrl.coef, 0.19992, 1e-9)
    ctrl.update(6.6, 10)  # e = 0.1 -> 0.19992 · 1.01 = 0.2019192
    close(ctrl.coef, 0.2019192, 1e-9)
    restored = AdaptiveKL(init_coef=1.0, target=6.0, horizon=100)
    restored.load_state_dict(ctrl.state_dict())
    assert restored.coef == ctrl.coef
    with pytest.raises(ValueError, match="coef"):
        FixedKL(-1.0)
