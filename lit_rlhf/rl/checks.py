"""``RLHFModule``'s checks on what it is given: arguments that cannot work together fail before any weights are read
(in the module, and in the pipeline before its first stage); checkpoints of an older layout are upgraded on load."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from lightning.pytorch.utilities import rank_zero_warn

from lit_rlhf.rl.optimizers import PPO
from lit_rlhf.rl.policy import ValueModel, check_policy_options
from lit_rlhf.rl.vllm import require_vllm

_OLD_SCHEDULE_ATTRIBUTES = ("epochs", "num_minibatches", "target_kl")
_OLD_MODEL_PREFIXES = ("policy.", "reference.", "value_model.", "value_head.")


def check_arguments(arguments: Mapping[str, Any], prefix: str = "model.") -> ValueModel:
    """Fail on ``RLHFModule`` arguments that cannot work together, before any weights are read; returns the critic
    to build (``value_model`` resolved against the algorithm).

    ``arguments``: all its keyword arguments by name, ``algorithm`` as an instance or None (``PPO()``). Errors name
    them ``{prefix}{argument}``, as the user wrote them (``model.`` in a stage recipe, ``rl.`` in the pipeline).
    """
    args = arguments
    algorithm = args["algorithm"] if args["algorithm"] is not None else PPO()
    name = type(algorithm).__name__
    stale = [attribute for attribute in _OLD_SCHEDULE_ATTRIBUTES if hasattr(algorithm, attribute)]
    if stale:
        raise TypeError(
            f"{name} sets {', '.join(stale)}: the update schedule is one attribute now, "
            "schedule = lit_rlhf.rl.optimizers.UpdateSchedule(epochs=..., num_minibatches=..., target_kl=...)."
        )
    for key in ("learning_rate", "value_learning_rate", "max_grad_norm"):
        if args[key] is not None and not args[key] > 0:
            raise ValueError(f"{prefix}{key} must be > 0, got {args[key]}.")
    if args["gradient_accumulation_steps"] < 1:
        raise ValueError(
            f"{prefix}gradient_accumulation_steps must be >= 1, got {args['gradient_accumulation_steps']}."
        )
    for key in ("schedule_iterations", "max_iterations"):
        if args[key] is not None and args[key] < 1:
            raise ValueError(f"{prefix}{key} must be >= 1 (or null), got {args[key]}.")
    if args.get("ptx_coef", 0.0) < 0:
        raise ValueError(f"{prefix}ptx_coef must be >= 0 (0 disables PPO-ptx), got {args['ptx_coef']}.")
    if args["reward_clip"] is not None and args["reward_clip"] <= 0:
        raise ValueError(f"{prefix}reward_clip must be > 0 (or null to disable), got {args['reward_clip']}.")
    generation = args["generation"]
    if generation.do_sample and (generation.top_k > 0 or generation.top_p < 1.0):
        rank_zero_warn(
            f"{prefix}generation.top_k / top_p truncate the sampling distribution but not the log-probs of the "
            "update, so the ratio and KL are slightly off-policy; leave them at 0 / 1.0 unless you mean it."
        )
    if args["rollout_backend"] == "vllm":
        require_vllm()
    elif args["vllm"] is not None:
        raise ValueError(f"{prefix}vllm is only used with rollout_backend: vllm.")
    if generation.num_samples < algorithm.min_samples:
        raise ValueError(
            f"{name} compares completions of the same prompt: set {prefix}generation.num_samples >= "
            f"{algorithm.min_samples} (it is {generation.num_samples})."
        )
    critic = args["value_model"] or ("separate" if algorithm.needs_critic else "none")
    if algorithm.needs_critic and critic == "none":
        raise ValueError(f"{name} needs a critic: set {prefix}value_model to 'separate' or 'shared' (or null).")
    if not algorithm.needs_critic and critic != "none":
        raise ValueError(f"{name} uses no critic: set {prefix}value_model to 'none' (or null).")
    check_policy_options(
        critic,
        args["lora"],
        args["value_model_path"],
        args["load_in_8bit"],
        args["load_in_4bit"],
        args["reference_load_in_8bit"],
        args["reference_load_in_4bit"],
        prefix,
        args.get("trainable_layers"),
    )
    return critic


def upgrade_checkpoint(checkpoint: dict[str, Any]) -> None:
    """Move a checkpoint of lit_rlhf 0.1 into today's layout, in place: the models' keys (``policy.*`` ...) now sit
    under ``models.``, and NLPO's masked copy (kept beside the weights as ``rlhf.algorithm.masked_policy``) under
    ``algorithm.masked.``."""
    state = checkpoint["state_dict"]
    if any(key.startswith(_OLD_MODEL_PREFIXES) for key in state):
        checkpoint["state_dict"] = state = {
            (f"models.{key}" if key.startswith(_OLD_MODEL_PREFIXES) else key): value for key, value in state.items()
        }
    algorithm = checkpoint.get("rlhf", {}).pop("algorithm", None) or {}
    for key, value in algorithm.get("masked_policy", {}).items():
        state[f"algorithm.masked.{key}"] = value


def upgrade_checkpoint_file(source: str | Path, target: str | Path) -> Path:
    """Rewrite a checkpoint written by lit_rlhf 0.1 in today's layout (``upgrade_checkpoint``) so that it loads with
    ``torch.load(weights_only=True)`` and resumes with ``trainer.fit(module, ckpt_path=target)``.

    A module built in Python pickled its arguments (reward, algorithm, options) into the hyperparameters, with
    classes that have since moved; they are replaced by their class names. ``load_from_checkpoint`` then needs those
    arguments again (``RLHFModule.load_from_checkpoint(target, reward=..., algorithm=...)``).
    """
    import pickle

    class Placeholder:
        """Stands for an object of a lit_rlhf class while the file is read; its state is dropped."""

        def __init__(self, *args: Any, **kwargs: Any) -> None:
            pass

        def __setstate__(self, state: Any) -> None:
            pass

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> Any:
            if module.startswith("lit_rlhf."):
                return type(name, (Placeholder,), {"path": f"{module}.{name}"})
            return super().find_class(module, name)

    reader = ModuleType("lit_rlhf_0_1_pickle")  # torch.load takes a pickle-like module
    reader.Unpickler, reader.load = Unpickler, lambda handle, **kwargs: Unpickler(handle, **kwargs).load()
    checkpoint = torch.load(source, map_location="cpu", weights_only=False, pickle_module=reader)
    hparams = checkpoint.get("hyper_parameters", {})
    for key, value in hparams.items():
        if isinstance(value, Placeholder):
            hparams[key] = value.path
    upgrade_checkpoint(checkpoint)
    torch.save(checkpoint, target)
    return Path(target)
