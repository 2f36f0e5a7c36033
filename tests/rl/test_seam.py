"""The plug-in seam (``lit_rlhf.rl.optimizers.base``): an algorithm outside the package is one small
``PolicyOptimizer`` subclass, chosen from YAML by class_path with no edit to ``RLHFModule``; its hooks see the policy
and tensors, never the loop; models it owns move and checkpoint with the module."""

import ast
import copy
from pathlib import Path

import pytest
import torch
import yaml

import lit_rlhf
from lit_rlhf.rl import RLHFModule
from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.losses import policy_gradient_loss
from lit_rlhf.rl.optimizers import Experience, PolicyOptimizer, PolicyOutputs
from tests.rl.support import prompt_loader, tiny_module, trainer


class MeanBaseline(PolicyOptimizer):
    """REINFORCE with the batch's mean return as the baseline: the smallest algorithm worth the name."""

    def __init__(self, entropy_coef: float = 0.0) -> None:
        self.entropy_coef = entropy_coef

    def advantages(self, experience: Experience) -> tuple[torch.Tensor, None]:
        returns = experience.rewards.sum(-1)
        return (returns - returns.mean()).unsqueeze(-1) * experience.response_mask, None

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_loss = policy_gradient_loss(outputs.logprobs, batch.advantages, batch.response_mask)
        entropy = masked_mean(outputs.entropy, batch.response_mask)
        return policy_loss - self.entropy_coef * entropy, {"policy/loss": policy_loss.detach()}


class WithFrozenCopy(MeanBaseline):
    """Owns a model: a frozen copy of the initial policy, made in ``setup``."""

    def setup(self, policy: torch.nn.Module) -> None:
        self.initial = copy.deepcopy(policy).requires_grad_(False)


def test_an_outside_algorithm_trains_from_yaml_by_class_path(tmp_path):
    from lit_rlhf.cli import run_stage

    config = {
        "seed_everything": 0,
        "trainer": {
            "accelerator": "cpu", "max_epochs": 1, "limit_train_batches": 2, "limit_val_batches": 0,
            "logger": False, "enable_checkpointing": False, "enable_progress_bar": False,
            "default_root_dir": str(tmp_path),
        },
        "model": {
            "policy": "tiny-llama",
            "reward": {"class_path": "lit_rlhf.rewards.CharacterShareReward", "init_args": {"target": "a"}},
            "algorithm": {"class_path": "tests.rl.test_seam.MeanBaseline", "init_args": {"entropy_coef": 0.01}},
            "generation": {"max_new_tokens": 8, "num_samples": 2},
            "learning_rate": 1.0e-3,
        },
        "data": {"batch_size": 4, "limit": 8, "max_prompt_length": 48},
    }  # fmt: skip
    path = tmp_path / "mean_baseline.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_stage("rl", ["fit", "--config", str(path)])
    module = cli.model
    assert type(module.algorithm) is MeanBaseline and module.algorithm.entropy_coef == 0.01
    assert module.iteration == 2 and cli.datamodule.tokenizer_name == "tiny-llama"


def test_models_an_algorithm_owns_are_submodules_that_checkpoint(tmp_path):
    module = tiny_module(algorithm=WithFrozenCopy())
    keys = [key for key in module.state_dict() if key.startswith("algorithm.initial.")]
    assert keys and all(not p.requires_grad for p in module.algorithm.initial.parameters())
    run = trainer(1, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(module, prompt_loader())
    with torch.no_grad():  # state a freshly built copy cannot have: only the checkpoint can bring it back
        next(module.algorithm.initial.parameters()).add_(1.0)
    run.save_checkpoint(tmp_path / "owned.ckpt")
    checkpoint = torch.load(tmp_path / "owned.ckpt", weights_only=False)
    assert set(keys) <= set(checkpoint["state_dict"])
    loaded = tiny_module(algorithm=WithFrozenCopy())
    loaded.on_load_checkpoint(checkpoint)  # as Lightning restores: the hook, then the weights
    loaded.load_state_dict(checkpoint["state_dict"])
    for key in keys:
        assert torch.equal(loaded.state_dict()[key], module.state_dict()[key])


def test_the_old_update_schedule_attributes_fail_with_the_new_name():
    class OldStyle(MeanBaseline):
        epochs = 2

    with pytest.raises(TypeError, match="schedule = lit_rlhf.rl.optimizers.UpdateSchedule"):
        RLHFModule("tiny-llama", algorithm=OldStyle())


def test_no_algorithm_imports_the_training_loop():
    # Not even for type checking: hooks get the policy and tensors, so an algorithm reads alone.
    folder = Path(lit_rlhf.__file__).parent / "rl" / "optimizers"
    for path in folder.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                assert node.module != "lit_rlhf.rl.module" and node.module != "lit_rlhf.rl", (path.name, node.module)
