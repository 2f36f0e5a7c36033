"""Scaling paths that run on a CPU: 8-bit optimizers and 4/8-bit (Q)LoRA in every stage, 2-process DDP RL, gradient
checkpointing, checkpoint export. FSDP, BitsandbytesPrecision on CUDA and vLLM need a GPU: checked here by parsing
and by the errors they raise, not by running them."""

import json
import os
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf import models
from lit_rlhf.cli import main, run_stage
from lit_rlhf.models import LoraOptions, load_causal_lm, resolve
from lit_rlhf.rl import A2C, PPO
from tests.rl.support import Outputs, prompt_loader, tiny_module, trainer

bnb = pytest.importorskip("bitsandbytes")
ROOT = Path(__file__).parents[1]
RECIPES = ROOT / "recipes"
ADAMW8BIT = json.dumps({"class_path": "bitsandbytes.optim.AdamW8bit", "init_args": {"lr": 1e-2}})


def fresh_weights(name: str = "tiny-llama") -> dict[str, torch.Tensor]:
    return dict(AutoModelForCausalLM.from_pretrained(resolve(name)).state_dict())


def moved(model: torch.nn.Module, before: dict[str, torch.Tensor], prefix: str = "") -> set[str]:
    """Names of ``model``'s base weights that differ from ``before`` (keys matched after dropping ``prefix``)."""
    out = set()
    for name, tensor in model.state_dict().items():
        key = name.removeprefix(prefix)
        if key in before and tensor.shape == before[key].shape and not torch.equal(tensor, before[key]):
            out.add(key)
    return out


def assert_8bit_states(optimizer: torch.optim.Optimizer) -> None:
    assert isinstance(optimizer, bnb.optim.AdamW8bit)
    states = [s for s in optimizer.state.values() if "state1" in s]
    # Tensors of at least 4096 elements keep their Adam moments as uint8 blocks (bitsandbytes' min_8bit_size).
    assert any(s["state1"].dtype == torch.uint8 for s in states)


# --- 8-bit optimizers from YAML, every stage --------------------------------------------------------------------


def test_sft_trains_with_adamw8bit_from_yaml(tmp_path):
    cli = run_stage(
        "sft",
        ["fit", "--config", str(RECIPES / "sft" / "tiny.yaml"), "--model.optimizer", ADAMW8BIT]
        + ["--trainer.default_root_dir", str(tmp_path)],
    )
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert_8bit_states(cli.trainer.optimizers[0])
    assert moved(cli.model.model, fresh_weights())


def test_reward_model_trains_with_adamw8bit_from_yaml(tmp_path):
    cli = run_stage(
        "reward",
        ["fit", "--config", str(RECIPES / "reward" / "minilm_tiny.yaml"), "--model.backbone", "tiny-llama"]
        + ["--model.optimizer", ADAMW8BIT, "--trainer.default_root_dir", str(tmp_path)],
    )
    assert torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    assert_8bit_states(cli.trainer.optimizers[0])
    assert moved(cli.model.model, fresh_weights())  # the trunk: same "model.*" names as the causal LM


def test_rl_trains_with_adamw8bit_from_yaml(tmp_path):
    cli = run_stage(
        "rl",
        ["fit", "--config", str(RECIPES / "rl" / "ppo_tiny.yaml"), "--model.optimizer", ADAMW8BIT]
        + ["--trainer.default_root_dir", str(tmp_path)],
    )
    metrics = cli.trainer.callback_metrics
    assert torch.isfinite(metrics["policy/loss"]) and torch.isfinite(metrics["value/loss"])
    assert_8bit_states(cli.trainer.optimizers[0])
    # The module's learning rates reach bitsandbytes through the parameter groups.
    assert [g["lr"] for g in cli.trainer.optimizers[0].param_groups] == [1e-2, 1e-2]
    assert moved(cli.model.policy, fresh_weights())


# --- quantised bases (bitsandbytes CPU kernels here; CUDA elsewhere) -------------------------------------------


def test_qlora_sft_exports_a_plain_float_checkpoint(tmp_path):
    lora = json.dumps({"r": 4, "alpha": 8})
    cli = run_stage(
        "sft",
        ["fit", "--config", str(RECIPES / "sft" / "tiny.yaml"), "--model.load_in_4bit", "true", "--model.lora", lora]
        + ["--model.learning_rate", "0.05", "--trainer.default_root_dir", str(tmp_path)],
    )
    model = cli.model.model
    assert models.is_quantised(model) and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    assert any(p.abs().sum() > 0 for n, p in model.named_parameters() if "lora_B" in n), "adapters did not train"

    out = cli.model.export(tmp_path / "hf")
    plain = AutoModelForCausalLM.from_pretrained(out)
    assert not any(isinstance(m, (bnb.nn.Linear4bit, bnb.nn.Linear8bitLt)) for m in plain.modules())
    assert "quantization_config" not in json.loads((out / "config.json").read_text())
    # The export is the full-precision base plus the trained adapter, merged.
    from peft import get_peft_model_state_dict, set_peft_model_state_dict

    reference = load_causal_lm("tiny-llama", lora=LoraOptions(r=4, alpha=8))
    set_peft_model_state_dict(reference, get_peft_model_state_dict(model))
    ids = torch.tensor([[5, 6, 7, 8, 9]])
    torch.testing.assert_close(plain(input_ids=ids).logits, reference(input_ids=ids).logits, rtol=1e-4, atol=1e-4)


def test_8bit_lora_reward_model_trains(tmp_path):
    cli = run_stage(
        "reward",
        ["fit", "--config", str(RECIPES / "reward" / "minilm_tiny.yaml"), "--model.backbone", "tiny-llama"]
        + ["--model.load_in_8bit", "true", "--model.lora", json.dumps({"r": 4})]
        + ["--model.learning_rate", "0.01", "--trainer.default_root_dir", str(tmp_path)],
    )
    assert models.is_quantised(cli.model.model) and torch.isfinite(cli.trainer.callback_metrics["train/loss"])
    out = cli.model.export(tmp_path / "hf")
    from lit_rlhf.reward import RewardModel

    scores = RewardModel(str(out), device="cpu")(["hi", "hello"], ["a", "b"])
    assert scores.shape == (2,) and torch.isfinite(scores).all()


def test_qlora_rl_reference_is_the_quantised_base_with_the_adapter_off(tmp_path):
    module = tiny_module(algorithm=A2C(), lora=LoraOptions(r=4), load_in_4bit=True, learning_rate=5e-2)
    assert module.models.reference is None and models.is_quantised(module.policy)
    outputs = Outputs()
    trainer(2, callbacks=[outputs]).fit(module, prompt_loader())
    first, second = (o["metrics"] for o in outputs.outputs)
    assert first["objective/kl"] == 0.0  # lora_B starts at zero: policy == adapter-off base, exactly
    assert second["objective/kl"] != 0.0 and all(map(torch.isfinite, map(torch.tensor, second.values())))
    plain = AutoModelForCausalLM.from_pretrained(module.export(tmp_path / "policy"))
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in plain.modules())
    # A2C's separate critic has a QLoRA trunk too: it exports merged into its full-precision base
    from transformers import AutoModelForTokenClassification

    critic = AutoModelForTokenClassification.from_pretrained(tmp_path / "policy" / "critic")
    assert not any(isinstance(m, bnb.nn.Linear4bit) for m in critic.modules())
    assert torch.equal(critic.score.bias, module.models.value_model.head.bias.detach().cpu())


def test_rl_reference_can_be_loaded_quantised_without_lora():
    module = tiny_module(algorithm=A2C(), reference_load_in_8bit=True)
    assert models.is_quantised(module.models.reference) and not models.is_quantised(module.policy)
    outputs = Outputs()
    trainer(1, callbacks=[outputs]).fit(module, prompt_loader())
    assert torch.isfinite(torch.tensor(outputs.outputs[0]["metrics"]["objective/kl"]))


def test_quantisation_options_fail_clearly(monkeypatch):
    from lit_rlhf.reward import RewardModelModule
    from lit_rlhf.sft import SFTModule

    with pytest.raises(ValueError, match="set model.lora"):
        SFTModule(model="tiny-llama", load_in_4bit=True)
    with pytest.raises(ValueError, match="set model.lora"):
        RewardModelModule(backbone="tiny-llama", load_in_8bit=True)
    with pytest.raises(ValueError, match="set model.lora"):
        tiny_module(load_in_8bit=True)
    with pytest.raises(ValueError, match="adapter off"):
        tiny_module(lora=LoraOptions(r=4), reference_load_in_4bit=True)
    with pytest.raises(ValueError, match="exclusive"):
        models.quantization_config(True, True)
    # A bitsandbytes without CPU kernels on a machine without CUDA: say so before loading anything.
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.setattr(importlib.util, "find_spec", lambda n: None if n == "bitsandbytes.backends.cpu" else real(n))
    with pytest.raises(RuntimeError, match="need a CUDA device"):
        load_causal_lm("tiny-llama", load_in_4bit=True)


def test_bitsandbytes_precision_plugin_with_lora_says_what_to_use():
    # Lightning refuses the plugin without CUDA, but its conversion runs here: it quantises every nn.Linear, peft's
    # adapters too, so nothing is left to train. The modules say what to use instead.
    from lightning.pytorch.plugins import BitsandbytesPrecision

    from lit_rlhf.sft import SFTModule

    plugin = BitsandbytesPrecision("nf4", dtype=torch.float32)
    for module in (tiny_module(algorithm=A2C(), lora=LoraOptions(r=4)), SFTModule("tiny-llama", lora=LoraOptions(r=4))):
        plugin.convert_module(module)
        with pytest.raises(ValueError, match="load_in_4bit / load_in_8bit with lora"):
            module.configure_optimizers()


# --- DDP on CPU, gradient checkpointing, export ------------------------------------------------------------------


@pytest.mark.parametrize("update", ["accumulate", "one-minibatch"])
def test_rl_under_two_process_ddp(tmp_path, update):
    # Both ranks see the same prompts (no distributed sampler): only the per-rank sampling seed tells them apart.
    # "accumulate": 2 minibatches of 2 micro-batches each; "one-minibatch": the update reuses the rollout's forward.
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "OMP_NUM_THREADS": "1", "PYTHONWARNINGS": "ignore"}
    script = ROOT / "tests" / "scripts" / "ddp_rl.py"
    args = [sys.executable, str(script), str(tmp_path)] + (["--one-minibatch"] if update == "one-minibatch" else [])
    done = subprocess.run(args, env=env, capture_output=True, text=True, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in (0, 1)]
    assert len(ranks[0]["weights"]) == 3
    for step, (a, b) in enumerate(zip(ranks[0]["weights"], ranks[1]["weights"], strict=True)):
        assert torch.equal(a, b), f"ranks disagree after iteration {step}: gradients were not all-reduced"
        assert not torch.equal(a, ranks[0]["initial"])
    assert ranks[0]["completions"][0] != ranks[1]["completions"][0]
    for step in range(3):
        m0, m1 = ranks[0]["metrics"][step], ranks[1]["metrics"][step]
        assert m0 == pytest.approx(m1)  # logged metrics are reduced over ranks, so both log the same numbers
        local = [r["local_scores"][step].mean().item() for r in ranks]
        assert m0["objective/score"] == pytest.approx(sum(local) / 2, abs=1e-6)


def test_rl_gradient_checkpointing_gives_the_same_update():
    def weights(**kwargs):
        module = tiny_module(algorithm=PPO(epochs=1), **kwargs)
        trainer(1).fit(module, prompt_loader())
        return {n.replace("._checkpoint_wrapped_module", ""): p for n, p in module.policy.named_parameters()}

    plain, checkpointed = weights(), weights(gradient_checkpointing=True)
    assert plain.keys() == checkpointed.keys()
    for name, p in plain.items():
        torch.testing.assert_close(checkpointed[name], p, rtol=1e-5, atol=1e-6, msg=name)


def test_export_command_turns_a_checkpoint_into_a_transformers_folder(tmp_path, capsys):
    cli = run_stage(
        "sft",
        ["fit", "--config", str(RECIPES / "sft" / "tiny.yaml"), "--trainer.enable_checkpointing", "true"]
        + ["--trainer.default_root_dir", str(tmp_path)],
    )
    (ckpt,) = tmp_path.rglob("*.ckpt")
    main(["export", "sft", str(ckpt), str(tmp_path / "hf")])
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "hf")
    ids = torch.tensor([[5, 6, 7]])
    torch.testing.assert_close(plain(input_ids=ids).logits, cli.model.model.eval()(input_ids=ids).logits)
    with pytest.raises(SystemExit, match="consolidate_checkpoint"):
        main(["export", "sft", str(tmp_path), str(tmp_path / "other")])


# --- GPU-only paths: configuration and errors ------------------------------------------------------------------


def test_fsdp_strategy_takes_wrap_units_by_import_path():
    from torch.distributed.fsdp.wrap import ModuleWrapPolicy
    from transformers.modeling_layers import GradientCheckpointingLayer
    from transformers.models.llama.modeling_llama import LlamaDecoderLayer

    from lit_rlhf.scale import FSDPStrategy

    path = "transformers.models.llama.modeling_llama.LlamaDecoderLayer"
    strategy = FSDPStrategy(auto_wrap_policy=[path], activation_checkpointing_policy=[path])
    policy = strategy.kwargs["auto_wrap_policy"]
    assert isinstance(policy, ModuleWrapPolicy) and set(policy._module_classes) == {LlamaDecoderLayer}
    assert strategy._activation_checkpointing_kwargs  # set up after wrapping, on the GPU
    default = FSDPStrategy().kwargs["auto_wrap_policy"]
    assert set(default._module_classes) == {GradientCheckpointingLayer}  # any transformers decoder layer
    with pytest.raises(ValueError, match="full import path"):
        FSDPStrategy(auto_wrap_policy=["LlamaDecoderLayer"])


@pytest.mark.parametrize(
    "recipe", ["sft/smollm2_fsdp_8gpu.yaml", "rl/ppo_fsdp_8gpu.yaml", "reward/minilm_ddp_8gpu.yaml"]
)
def test_multi_gpu_recipes_parse_without_a_gpu(recipe, capsys):
    stage = {"sft": "sft", "rl": "rl", "reward": "reward"}[recipe.split("/")[0]]
    with pytest.raises(SystemExit):
        run_stage(stage, ["fit", "--config", str(RECIPES / recipe), "--print_config"])
    printed = capsys.readouterr().out
    assert "devices: 8" in printed
    if "fsdp" in recipe:
        assert "lit_rlhf.scale.FSDPStrategy" in printed and "LlamaDecoderLayer" in printed
        assert "HFExportCallback" not in printed  # it cannot gather shards; `lit-rlhf export` does it afterwards


def test_fsdp_refuses_rank0_export_callback_and_quantised_weights():
    from lit_rlhf.callbacks import HFExportCallback
    from lit_rlhf.scale import FSDPStrategy, check_strategy

    module = tiny_module(algorithm=A2C())
    module._trainer = SimpleNamespace(strategy=FSDPStrategy(), callbacks=[HFExportCallback()], world_size=8)
    with pytest.raises(ValueError, match="lit-rlhf export"):
        HFExportCallback().setup(module._trainer, module, "fit")
    check_strategy(module, quantised=False)  # the module itself shards fine
    with pytest.raises(ValueError, match="use strategy: ddp for QLoRA"):
        check_strategy(module, quantised=True)
    module._trainer = None


def test_vllm_backend_says_how_to_install_it(monkeypatch):
    import importlib.util

    from lit_rlhf.rl.vllm import VLLMOptions

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "vllm" else real(name, *a))
    with pytest.raises(ModuleNotFoundError, match=r"pip install lit-rlhf\[vllm\]"):
        tiny_module(rollout_backend="vllm")
    with pytest.raises(ValueError, match="only used with rollout_backend: vllm"):
        tiny_module(vllm=VLLMOptions())
    with pytest.raises(ValueError, match="gpu_memory_utilization"):
        VLLMOptions(gpu_memory_utilization=1.5)
