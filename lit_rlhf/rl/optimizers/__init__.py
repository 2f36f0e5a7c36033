"""RL algorithms as ``PolicyOptimizer`` plug-ins of ``RLHFModule``: PPO, A2C, NLPO (add yours as one subclass)."""

from lit_rlhf.rl.optimizers.a2c import A2C
from lit_rlhf.rl.optimizers.base import Experience, LogitsTransform, PolicyOptimizer, PolicyOutputs
from lit_rlhf.rl.optimizers.nlpo import NLPO, top_p_mask
from lit_rlhf.rl.optimizers.ppo import PPO

__all__ = ["A2C", "NLPO", "PPO", "Experience", "LogitsTransform", "PolicyOptimizer", "PolicyOutputs", "top_p_mask"]
