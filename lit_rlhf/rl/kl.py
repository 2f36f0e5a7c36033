"""KL to the reference model: per-token estimators (k1, k3) and the controllers that set the penalty coefficient β."""

from __future__ import annotations

from abc import ABC, abstractmethod
from typing import Any, Literal

from torch import Tensor

from lit_rlhf.hparams import Configurable

KLEstimator = Literal["k1", "k3"]


def kl_k1(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k1 = log π(y_t) - log π_ref(y_t): unbiased for KL[π‖π_ref] under y ~ π, high variance, can be negative.

    See J. Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html).

    Shape: (B, T), (B, T) -> (B, T).
    """
    return logprobs - ref_logprobs


def kl_k3(logprobs: Tensor, ref_logprobs: Tensor) -> Tensor:
    """k3 = (r - 1) - log r with r = π_ref(y_t) / π(y_t): unbiased, low variance and never negative.

    See J. Schulman, "Approximating KL Divergence" (joschu.net/blog/kl-approx.html).

    Shape: (B, T), (B, T) -> (B, T).
    """
    log_ratio = ref_logprobs - logprobs
    return log_ratio.exp() - 1 - log_ratio


def kl_estimate(logprobs: Tensor, ref_logprobs: Tensor, estimator: KLEstimator = "k1") -> Tensor:
    """Per-token KL estimate with the named estimator. Shape: (B, T), (B, T) -> (B, T)."""
    if estimator == "k1":
        return kl_k1(logprobs, ref_logprobs)
    if estimator == "k3":
        return kl_k3(logprobs, ref_logprobs)
    raise ValueError(f"kl_estimator must be 'k1' or 'k3', got {estimator!r}.")


class KLController(Configurable, ABC):
    """Holds the KL penalty coefficient β and updates it once per iteration from the measured KL."""

    coef: float
    """The current coefficient β."""

    @abstractmethod
    def update(self, kl: float, n_steps: int) -> None:
        """Adjust β after an iteration whose responses had mean sequence KL ``kl`` over ``n_steps`` samples."""

    def state_dict(self) -> dict[str, Any]:
        return {"coef": self.coef}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.coef = float(state["coef"])


class FixedKL(KLController):
    """A constant KL coefficient.

    Args:
        coef: The penalty β in r_t = -β·kl_t.
    """

    def __init__(self, coef: float = 0.05) -> None:
        if coef < 0:
            raise ValueError(f"FixedKL(coef={coef}): the KL coefficient must be >= 0.")
        self.coef = float(coef)

    def update(self, kl: float, n_steps: int) -> None:
        pass


class AdaptiveKL(KLController):
    """Steer β so the sequence KL tracks a target (Ziegler et al. 2019, "Fine-Tuning Language Models from Human
    Preferences", eq. 2): e = clip(KL / target - 1, -0.2, 0.2), β ← β·(1 + e·n / horizon).

    Args:
        init_coef: Starting β.
        target: KL (nats per sequence) to aim for.
        horizon: Samples over which β may change by a factor of about e^±0.2; larger is slower.
    """

    def __init__(self, init_coef: float = 0.2, target: float = 6.0, horizon: int = 10000) -> None:
        if init_coef <= 0 or target <= 0 or horizon <= 0:
            raise ValueError(
                f"AdaptiveKL(init_coef={init_coef}, target={target}, horizon={horizon}): all three must be > 0."
            )
        self.coef = float(init_coef)
        self.target = float(target)
        self.horizon = int(horizon)

    def update(self, kl: float, n_steps: int) -> None:
        error = min(max(kl / self.target - 1.0, -0.2), 0.2)
        self.coef *= 1.0 + error * n_steps / self.horizon
