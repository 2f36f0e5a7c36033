"""The plug-in seam: a new algorithm (RLOO) is one small PolicyOptimizer subclass, used from Python and from YAML
by class_path, with no edit to RLHFModule. docs/new-algorithm.md walks through the same class."""

import inspect

import torch
import yaml

from lit_rlhf.rl import GenerationOptions
from lit_rlhf.rl.advantages import masked_mean
from lit_rlhf.rl.losses import policy_gradient_loss
from lit_rlhf.rl.optimizers import Experience, PolicyOptimizer, PolicyOutputs
from tests.test_rl_support import (
    PROMPTS,
    Outputs,
    prompt_batch,
    prompt_loader,
    tiny_module,
    trainer,
)


class RLOO(PolicyOptimizer):
    """REINFORCE Leave-One-Out (Ahmadian et al. 2024, arXiv 2402.14740): no critic; each completion's baseline is
    the mean return of the other completions of the same prompt (``generation.num_samples`` >= 2).

    Args:
        entropy_coef: Weight of the entropy bonus.
    """

    def __init__(self, entropy_coef: float = 0.0) -> None:
        self.entropy_coef = entropy_coef

    def advantages(self, experience: Experience) -> tuple[torch.Tensor, None]:
        returns = experience.rewards.sum(-1)  # (B,) score - β·KL of each completion
        group = experience.group
        counts = torch.bincount(group).to(returns.dtype)
        if (counts < 2).any():
            raise ValueError("RLOO needs at least 2 completions per prompt: set model.generation.num_samples >= 2.")
        totals = returns.new_zeros(len(counts)).index_add(0, group, returns)
        baseline = (totals[group] - returns) / (counts[group] - 1)
        return (returns - baseline).unsqueeze(-1) * experience.response_mask, None

    def loss(self, batch: Experience, outputs: PolicyOutputs) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        policy_loss = policy_gradient_loss(outputs.logprobs, batch.advantages, batch.response_mask)
        entropy = masked_mean(outputs.entropy, batch.response_mask)
        loss = policy_loss - self.entropy_coef * entropy
        return loss, {"policy/loss": policy_loss.detach(), "policy/entropy": entropy.detach()}


def test_the_new_algorithm_is_small():
    assert len(inspect.getsource(RLOO).splitlines()) <= 60


def test_rloo_leave_one_out_advantages():
    # prompt 0 has returns [1, 2, 3]: baselines [(2+3)/2, (1+3)/2, (1+2)/2] = [2.5, 2, 1.5] -> A = [-1.5, 0, 1.5]
    # prompt 1 has returns [0, 4]: baselines [4, 0] -> A = [-4, 4]; spread over each row's response tokens
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0], [1.0, 1.0], [1.0, 1.0], [1.0, 1.0]])
    rewards = torch.tensor([[0.0, 1.0], [2.0, 0.0], [1.0, 2.0], [0.0, 0.0], [3.0, 1.0]])
    empty = torch.zeros(5, 2)
    experience = Experience(
        prompt_ids=torch.zeros(5, 1, dtype=torch.long), prompt_mask=torch.ones(5, 1), response_ids=empty.long(),
        response_mask=mask, logprobs=empty, ref_logprobs=empty, values=None, scores=torch.zeros(5), kl=empty,
        rewards=rewards, group=torch.tensor([0, 0, 0, 1, 1]),
    )  # fmt: skip
    advantages, returns = RLOO().advantages(experience)
    assert returns is None
    torch.testing.assert_close(advantages, torch.tensor([[-1.5, -1.5], [0.0, 0.0], [1.5, 1.5], [-4.0, -4.0], [4, 4.0]]))


def test_rloo_trains_through_rlhf_module():
    module = tiny_module(algorithm=RLOO(), generation=GenerationOptions(max_new_tokens=8, num_samples=2))
    assert module.value_model is None and module.value_head is None  # no critic was built
    before = {n: p.detach().clone() for n, p in module.policy.named_parameters()}
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())
    assert all(torch.isfinite(torch.tensor(o["metrics"]["policy/loss"])) for o in outputs.outputs)
    assert len(outputs.outputs[0]["completions"]) == 2 * len(PROMPTS)
    assert any(not torch.equal(before[n], p) for n, p in module.policy.named_parameters())
    rollout = module.rollout(prompt_batch(PROMPTS[:2]))
    assert rollout.experience.group.tolist() == [0, 0, 1, 1]


def test_rloo_from_yaml_by_class_path(tmp_path):
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
            "algorithm": {"class_path": "tests.test_rl_seam.RLOO", "init_args": {"entropy_coef": 0.01}},
            "generation": {"max_new_tokens": 8, "num_samples": 2},
            "learning_rate": 1.0e-3,
        },
        "data": {"batch_size": 4, "limit": 8, "max_prompt_length": 48},
    }  # fmt: skip
    path = tmp_path / "rloo.yaml"
    path.write_text(yaml.safe_dump(config))
    cli = run_stage("rl", ["fit", "--config", str(path)])
    module = cli.model
    assert type(module.algorithm).__name__ == "RLOO" and module.algorithm.entropy_coef == 0.01
    assert module.iteration == 2 and cli.datamodule.tokenizer_name == "tiny-llama"
