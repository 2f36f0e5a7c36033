"""RL algorithms as ``PolicyOptimizer`` plug-ins of ``RLHFModule``: PPO, A2C, NLPO, RLOO, GRPO,
REINFORCE++ (add yours as one subclass), and the types an algorithm works with."""

from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.optimizers.a2c import A2C
from lit_rlhf.rl.optimizers.base import PolicyOptimizer, UpdateSchedule
from lit_rlhf.rl.optimizers.grpo import GRPO
from lit_rlhf.rl.optimizers.nlpo import NLPO, top_p_mask
from lit_rlhf.rl.optimizers.ppo import PPO
from lit_rlhf.rl.optimizers.reinforce_pp import ReinforcePP
from lit_rlhf.rl.optimizers.rloo import RLOO
from lit_rlhf.rl.policy import LogitsTransform

__all__ = [
    "A2C",
    "GRPO",
    "NLPO",
    "PPO",
    "RLOO",
    "ReinforcePP",
    "Experience",
    "LogitsTransform",
    "PolicyOptimizer",
    "PolicyOutputs",
    "UpdateSchedule",
    "top_p_mask",
]
