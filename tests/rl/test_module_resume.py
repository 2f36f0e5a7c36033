"""Checkpoint and resume: a run resumed from a checkpoint continues exactly as the uninterrupted run."""

import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from lightning.pytorch.callbacks import ModelCheckpoint

from lit_rlhf.data import PromptDataModule
from lit_rlhf.models import LoraOptions
from lit_rlhf.rewards import CharacterShareReward
from lit_rlhf.rl import NLPO, PPO, AdaptiveKL, RLHFModule
from lit_rlhf.rl.checks import upgrade_checkpoint_file
from tests.rl.support import (
    Outputs,
    prompt_loader,
    tiny_module,
    trainer,
)

KEYS = ("objective/score", "objective/kl", "objective/kl_coef", "policy/loss", "value/loss", "policy/approx_kl")


def build(case: str) -> RLHFModule:
    # Each case exercises state beyond the weights: the adaptive KL coefficient, running reward moments, the
    # optimizer, and NLPO's masked copy (synced at iteration 0 and 3, so at the resume point it is stale on purpose).
    algorithm = PPO(epochs=2, num_minibatches=2) if case == "ppo" else NLPO(epochs=2, mask_update_interval=3)
    lora = LoraOptions(r=4) if case == "nlpo-lora" else None
    return tiny_module(algorithm=algorithm, lora=lora, kl=AdaptiveKL(0.1, 1.0, 100), normalize_reward=True)


@pytest.mark.parametrize("case", ["ppo", "nlpo", "nlpo-lora"])
def test_resumed_run_matches_uninterrupted_run(case, tmp_path):
    # One batch per epoch, so the epoch-end checkpoints fall between iterations.
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = Outputs()
    trainer(4, callbacks=[checkpoints, full], enable_checkpointing=True).fit(build(case), prompt_loader())

    path = tmp_path / "epoch=1.ckpt"
    # Nothing pickled, hyperparameters included: the module was built in Python, its components are described.
    checkpoint = torch.load(path, weights_only=True)
    assert checkpoint["rlhf"]["iteration"] == 2
    assert not any(key.startswith("models.reference.") for key in checkpoint["state_dict"])
    assert checkpoint["hyper_parameters"]["reward"]["class_path"] == "lit_rlhf.rewards.CharacterShareReward"

    resumed = Outputs()
    trainer(4, callbacks=[resumed]).fit(build(case), prompt_loader(), ckpt_path=path, weights_only=True)
    assert len(resumed.outputs) == 2
    for expected, actual in zip(full.outputs[2:], resumed.outputs, strict=True):
        assert actual["completions"] == expected["completions"]
        for key in KEYS:
            assert actual["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-5), key


def test_load_from_checkpoint_rebuilds_the_module(tmp_path):
    module = tiny_module(algorithm=NLPO(top_mask=0.5, epochs=2), kl=AdaptiveKL(0.1, 1.0, 100))
    run = trainer(1, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(module, prompt_loader())
    path = tmp_path / "model.ckpt"
    run.save_checkpoint(path)
    loaded = RLHFModule.load_from_checkpoint(path, weights_only=True)  # components rebuilt from their descriptions
    assert type(loaded.algorithm) is NLPO and loaded.algorithm.top_mask == 0.5
    assert loaded.algorithm.schedule.epochs == 2 and loaded.generator.reward.target == module.generator.reward.target
    assert loaded.iteration == 1 and loaded.kl.coef == module.kl.coef
    for (name, a), b in zip(module.policy.state_dict().items(), loaded.policy.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    masked = loaded.algorithm.masked.state_dict()
    assert all(torch.equal(v, masked[k]) for k, v in module.algorithm.masked.state_dict().items())


def as_written_by_version_0_1(checkpoint: dict) -> dict:
    """A checkpoint in lit_rlhf 0.1's layout: models' keys at the top of the state dict, NLPO's masked copy (and
    the algorithm's state) beside it under ``rlhf.algorithm``."""
    state = checkpoint["state_dict"]
    old = {key.removeprefix("models."): value for key, value in state.items() if not key.startswith("algorithm.")}
    masked = {k.removeprefix("algorithm.masked."): v for k, v in state.items() if k.startswith("algorithm.masked.")}
    rlhf = {**checkpoint["rlhf"], "algorithm": {"masked_policy": masked} if masked else {}}
    return {**checkpoint, "state_dict": old, "rlhf": rlhf}


def pickle_an_object_of_a_vanished_class(path, checkpoint: dict) -> None:
    """Save ``checkpoint`` with an object of ``lit_rlhf.rl.rollout.GenerationOptions`` (a 0.1 class whose module is
    gone) in its hyperparameters, as modules built in Python did."""
    gone = types.ModuleType("lit_rlhf.rl.rollout")
    gone.GenerationOptions = type("GenerationOptions", (), {"__module__": "lit_rlhf.rl.rollout"})
    sys.modules["lit_rlhf.rl.rollout"] = gone
    try:
        checkpoint["hyper_parameters"] = {**checkpoint["hyper_parameters"], "generation": gone.GenerationOptions()}
        torch.save(checkpoint, path)
    finally:
        del sys.modules["lit_rlhf.rl.rollout"]


@pytest.mark.parametrize("case", ["ppo", "nlpo"])
def test_a_checkpoint_of_the_old_layout_resumes_exactly(case, tmp_path):
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{epoch}", save_top_k=-1, every_n_epochs=1)
    full = Outputs()
    trainer(3, callbacks=[checkpoints, full], enable_checkpointing=True).fit(build(case), prompt_loader())
    old = as_written_by_version_0_1(torch.load(tmp_path / "epoch=1.ckpt", weights_only=True))
    assert any(key.startswith("policy.") for key in old["state_dict"])
    pickle_an_object_of_a_vanished_class(tmp_path / "old.ckpt", old)
    with pytest.raises(ModuleNotFoundError, match="lit_rlhf.rl.rollout"):
        torch.load(tmp_path / "old.ckpt", weights_only=False)
    upgraded = upgrade_checkpoint_file(tmp_path / "old.ckpt", tmp_path / "upgraded.ckpt")
    hparams = torch.load(upgraded, weights_only=True)["hyper_parameters"]  # nothing pickled left
    assert hparams["generation"] == "lit_rlhf.rl.rollout.GenerationOptions"
    resumed = Outputs()
    trainer(3, callbacks=[resumed]).fit(build(case), prompt_loader(), ckpt_path=upgraded, weights_only=True)
    assert len(resumed.outputs) == 1
    assert resumed.outputs[0]["completions"] == full.outputs[2]["completions"]
    for key in KEYS:
        assert resumed.outputs[0]["metrics"][key] == pytest.approx(full.outputs[2]["metrics"][key], abs=1e-5), key


def test_an_argument_that_cannot_be_described_is_left_out_with_a_warning(tmp_path):
    with pytest.warns(UserWarning, match="reward cannot be written into checkpoints as plain data"):
        module = tiny_module(reward=lambda prompts, completions: [1.0] * len(completions))
    assert module.hparams["reward"] is None
    run = trainer(1, enable_checkpointing=True, default_root_dir=tmp_path)
    run.fit(module, prompt_loader())
    run.save_checkpoint(tmp_path / "lambda.ckpt")
    torch.load(tmp_path / "lambda.ckpt", weights_only=True)
    loaded = RLHFModule.load_from_checkpoint(tmp_path / "lambda.ckpt", reward=CharacterShareReward("b"))
    assert loaded.generator.reward.target == frozenset("b")


def prompt_data() -> PromptDataModule:
    """Eight packaged prompts in batches of two, shuffled by (seed, epoch): four iterations per epoch."""
    return PromptDataModule(tokenizer="tiny-llama", limit=8, batch_size=2, max_prompt_length=48, val_limit=2)


def test_a_run_resumed_in_the_middle_of_an_epoch_skips_and_replays_nothing(tmp_path):
    # PPO with 2 epochs x 2 minibatches: 4 optimizer steps per iteration, so a checkpoint every 4 steps is one per
    # iteration. The one after iteration 6 lies in the middle of the second epoch (its second of four batches).
    checkpoints = ModelCheckpoint(dirpath=tmp_path, filename="{step}", save_top_k=-1, every_n_train_steps=4)
    full = Outputs()
    trainer(2, callbacks=[checkpoints, full], enable_checkpointing=True, limit_val_batches=0).fit(
        build("ppo"), prompt_data()
    )
    assert len(full.outputs) == 8
    resumed = Outputs()
    run = trainer(2, callbacks=[resumed], limit_val_batches=0)
    module = build("ppo")
    run.fit(module, prompt_data(), ckpt_path=tmp_path / "step=24.ckpt", weights_only=True)
    # The prompts of iterations 7 and 8, not those of the epoch's first two batches again.
    assert [out["prompts"] for out in resumed.outputs] == [out["prompts"] for out in full.outputs[6:]]
    for expected, actual in zip(full.outputs[6:], resumed.outputs, strict=True):
        assert actual["completions"] == expected["completions"]
        for key in KEYS:
            assert actual["metrics"][key] == pytest.approx(expected["metrics"][key], abs=1e-5), key


def lit_rlhf_rl_fit(cwd, *args: str) -> subprocess.CompletedProcess:
    """``lit-rlhf rl fit`` on the PPO tiny recipe for 2 epochs of 3 iterations, as a user runs it, in ``cwd``."""
    recipe = Path(__file__).parents[2] / "recipes" / "rl" / "ppo_tiny.yaml"
    command = [sys.executable, "-m", "lit_rlhf.cli", "rl", "fit", "--config", str(recipe)]
    command += [
        "--trainer.max_epochs",
        "2",
        "--trainer.limit_val_batches",
        "0",
        "--trainer.enable_progress_bar",
        "false",
    ]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2]), "HF_HUB_OFFLINE": "1"}
    return subprocess.run([*command, *args], cwd=cwd, env=env, capture_output=True, text=True, timeout=600)


def final_policy(cwd) -> dict[str, torch.Tensor]:
    state = torch.load(Path(cwd) / "outputs/rl/ppo_tiny/checkpoints/last.ckpt", weights_only=True)
    assert state["rlhf"]["iteration"] == 6
    return {k: v for k, v in state["state_dict"].items() if k.startswith("models.policy.")}


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory) -> dict[str, torch.Tensor]:
    cwd = tmp_path_factory.mktemp("whole")
    assert lit_rlhf_rl_fit(cwd).returncode == 0
    return final_policy(cwd)


# Killed after iteration 4 (the first of the second epoch's three; the last checkpoint is the first epoch's end) or
# 5 (the last checkpoint lies inside the epoch), always before that iteration's own checkpoint.
@pytest.mark.parametrize("kill_at", [4, 5])
def test_kill_9_inside_an_epoch_then_ckpt_path_last_ends_with_the_uninterrupted_weights(
    kill_at, uninterrupted, tmp_path
):
    killed = lit_rlhf_rl_fit(
        tmp_path, "--trainer.callbacks+=tests.rl.support.KillAt", "--trainer.callbacks.iteration", str(kill_at)
    )
    assert killed.returncode == -signal.SIGKILL
    resumed = lit_rlhf_rl_fit(tmp_path, "--ckpt_path", "last")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert "no last checkpoint" not in resumed.stderr + resumed.stdout
    after_kill = final_policy(tmp_path)
    assert uninterrupted.keys() == after_kill.keys()
    for key, value in uninterrupted.items():
        assert torch.equal(value, after_kill[key]), key
