"""Stage 3, RL fine-tuning: ``RLHFModule`` and its plug-in algorithms (PPO, A2C, NLPO), KL control, rollout math."""

from lit_rlhf.rl.kl import AdaptiveKL, FixedKL, KLController
from lit_rlhf.rl.module import RLHFModule, Rollout
from lit_rlhf.rl.optimizers import A2C, NLPO, PPO, Experience, PolicyOptimizer, PolicyOutputs
from lit_rlhf.rl.rollout import GenerationOptions

__all__ = [
    "A2C",
    "NLPO",
    "PPO",
    "AdaptiveKL",
    "Experience",
    "FixedKL",
    "GenerationOptions",
    "KLController",
    "PolicyOptimizer",
    "PolicyOutputs",
    "RLHFModule",
    "Rollout",
]
