"""Stage 3, RL fine-tuning: ``RLHFModule`` and its plug-in algorithms (PPO, A2C, NLPO, RLOO, GRPO,
REINFORCE++), KL control, and the
pieces usable without any algorithm (``PolicyModels``, ``PolicyGenerator``)."""

from lit_rlhf.rl.decoding import GenerationOptions
from lit_rlhf.rl.experience import Experience, PolicyOutputs, Rollout, Samples
from lit_rlhf.rl.generation import PolicyGenerator
from lit_rlhf.rl.kl import AdaptiveKL, FixedKL, KLController
from lit_rlhf.rl.module import RLHFModule
from lit_rlhf.rl.optimizers import A2C, GRPO, NLPO, PPO, RLOO, PolicyOptimizer, ReinforcePP, UpdateSchedule
from lit_rlhf.rl.policy import PolicyModels

__all__ = [
    "A2C",
    "GRPO",
    "NLPO",
    "PPO",
    "RLOO",
    "ReinforcePP",
    "AdaptiveKL",
    "Experience",
    "FixedKL",
    "GenerationOptions",
    "KLController",
    "PolicyGenerator",
    "PolicyModels",
    "PolicyOptimizer",
    "PolicyOutputs",
    "RLHFModule",
    "Rollout",
    "Samples",
    "UpdateSchedule",
]
