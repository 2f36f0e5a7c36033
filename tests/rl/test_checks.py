"""``RLHFModule``'s argument checks (``lit_rlhf.rl.checks``): settings that cannot work fail before any weights load,
with the option named as the user wrote it."""

import inspect

import pytest

from lit_rlhf.rl import A2C, GRPO, RLOO, GenerationOptions, ReinforcePP, RLHFModule
from lit_rlhf.rl.checks import check_arguments
from lit_rlhf.sft import SFTModule

DEFAULTS = {n: p.default for n, p in inspect.signature(RLHFModule).parameters.items() if n != "policy"}


@pytest.mark.parametrize(
    "changes, message",
    [
        ({"learning_rate": -1.0}, "model.learning_rate must be > 0, got -1.0."),
        ({"value_learning_rate": 0.0}, "model.value_learning_rate must be > 0, got 0.0."),
        ({"max_iterations": 0}, "model.max_iterations must be >= 1 (or null), got 0."),
        ({"reward_clip": -1.0}, "model.reward_clip must be > 0"),
        ({"gradient_accumulation_steps": 0}, "model.gradient_accumulation_steps must be >= 1, got 0."),
        ({"algorithm": A2C(), "value_model": "none"}, "A2C needs a critic: set model.value_model to"),
        (
            {"algorithm": RLOO(), "value_model": "shared", "generation": GenerationOptions(num_samples=2)},
            "RLOO uses no critic: set model.value_model to 'none'",
        ),
        ({"algorithm": GRPO()}, "GRPO compares completions of the same prompt: set model.generation.num_samples >= 2"),
        (
            {"algorithm": ReinforcePP(baseline="group")},
            "ReinforcePP compares completions of the same prompt: set model.gen",
        ),
        ({"load_in_4bit": True}, "set model.lora to train adapters"),
    ],
)
def test_bad_arguments_fail_before_any_weights_load(changes, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        check_arguments({**DEFAULTS, **changes})
    with pytest.raises(ValueError, match="rl." + message.split("model.", 1)[-1][:20].replace("(", r"\(")):
        check_arguments({**DEFAULTS, **changes}, prefix="rl.")
    with pytest.raises(ValueError):
        RLHFModule("no-such-model-is-ever-loaded", **changes)  # fails on the arguments, not on the missing model


def test_supervised_stages_check_their_arguments_before_loading():
    with pytest.raises(ValueError, match=r"model.warmup_ratio must be in \[0, 1\), got 2.0."):
        SFTModule("no-such-model-is-ever-loaded", warmup_ratio=2.0)
    with pytest.raises(ValueError, match="model.learning_rate must be > 0, got 0.0."):
        SFTModule("no-such-model-is-ever-loaded", learning_rate=0.0)
