"""Training only the top layers (``lit_rlhf.freezing``, ``models.train_top_layers`` and every stage's
``trainable_layers``): what stays trainable, that frozen weights get no gradient or optimizer state while the rest
trains, LoRA on those layers only (the demo recipes' old hand-written targets exactly), and the errors."""

import dataclasses

import lightning as L
import pytest
import torch
from transformers import LlamaForCausalLM

from lit_rlhf.cli import run_stage
from lit_rlhf.data import PreferenceDataModule, SFTDataModule
from lit_rlhf.freezing import freeze_below, layer_stack, top_layer_targets
from lit_rlhf.models import (
    LoraOptions,
    ScalarHead,
    load_causal_lm,
    load_sequence_classifier,
    tiny_llama_config,
    train_top_layers,
)
from lit_rlhf.reward import RewardModelModule
from lit_rlhf.rl import RLHFModule
from lit_rlhf.sft import SFTModule
from tests.pipeline.support import RECIPES, TINY, parse
from tests.rl.support import prompt_loader, tiny_module, trainer

EXAMPLES = "lit_rlhf/data/examples"
# The adapters recipes/pipeline/demo.yaml and quick.yaml named by hand before trainable_layers: 8 replaced them.
DEMO_REGEX = r".*layers\.(2[2-9])\.(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
PIPELINE_RECIPES = [p for p in RECIPES if p.stem in ("demo", "quick")]


def trainable(model: torch.nn.Module) -> set[str]:
    return {name for name, p in model.named_parameters() if p.requires_grad}


def llama(layers: int, tied: bool = True) -> LlamaForCausalLM:
    """A random Llama of the tiny shape with ``layers`` layers, built in memory (no checkpoint needed)."""
    torch.manual_seed(0)
    return LlamaForCausalLM(tiny_llama_config(100, num_hidden_layers=layers, tie_word_embeddings=tied))


def layer_params(prefix: str, index: int) -> set[str]:
    names = ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj"]
    names += ["mlp.gate_proj", "mlp.up_proj", "mlp.down_proj", "input_layernorm", "post_attention_layernorm"]
    return {f"{prefix}.{index}.{name}.weight" for name in names}


def test_the_layer_stack_is_found_in_decoders_trunks_and_encoders(tiny_llama_path):
    name, stack = layer_stack(load_causal_lm(tiny_llama_path))
    assert (name, len(stack)) == ("model.layers", 2)
    assert layer_stack(ScalarHead.from_pretrained(tiny_llama_path).trunk)[0] == "layers"
    name, stack = layer_stack(load_sequence_classifier("all-minilm-l6-v2"))
    assert (name, len(stack)) == ("bert.encoder.layer", 6)
    with pytest.raises(ValueError, match="needs one stack of transformer layers, but Linear has 0"):
        layer_stack(torch.nn.Linear(2, 2))


def test_the_top_layers_final_norm_and_an_untied_head_train_and_nothing_below():
    model = llama(3, tied=False)
    freeze_below(model, 2)
    assert trainable(model) == layer_params("model.layers", 1) | layer_params("model.layers", 2) | {
        "model.norm.weight",
        "lm_head.weight",
    }


def test_a_head_tied_to_the_input_embedding_stays_frozen():
    model = llama(3, tied=True)
    freeze_below(model, 1)
    assert model.lm_head.weight is model.model.embed_tokens.weight and not model.lm_head.weight.requires_grad
    assert trainable(model) == layer_params("model.layers", 2) | {"model.norm.weight"}


def test_all_layers_is_the_same_as_none():
    assert trainable(train_top_layers(llama(2), 2)) == trainable(llama(2))
    lora = LoraOptions(r=4)
    every, none = train_top_layers(llama(2), 2, lora), train_top_layers(llama(2), None, lora)
    assert every.peft_config["default"].target_modules == none.peft_config["default"].target_modules
    assert trainable(every) == trainable(none)


@pytest.mark.parametrize("recipe", PIPELINE_RECIPES, ids=lambda p: p.stem)
def test_the_recipes_trainable_layers_trains_what_their_old_regex_did(recipe):
    # SmolLM2-135M has 30 layers: a 30-layer tiny Llama has the same module names. (Checked on SmolLM2 itself by
    # hand: both give the same 112 tensors, 1,302,528 parameters.)
    rl = parse("--config", str(recipe)).rl.model
    assert rl["trainable_layers"] == 8 and rl["lora"].target_modules == "all-linear"
    regex = dataclasses.replace(rl["lora"], target_modules=DEMO_REGEX)
    old = trainable(train_top_layers(llama(30), None, regex))
    new = trainable(train_top_layers(llama(30), rl["trainable_layers"], rl["lora"]))
    assert new == old and len(new) == 8 * 7 * 2  # lora_A and lora_B on 7 projections of layers 22-29
    assert {int(name.split("layers.")[1].split(".")[0]) for name in new} == set(range(22, 30))


def test_lora_targets_are_read_as_peft_reads_them_within_the_top_layers():
    assert sorted(top_layer_targets(llama(3), ["q_proj", "v_proj"], 1)) == [
        "model.layers.2.self_attn.q_proj",
        "model.layers.2.self_attn.v_proj",
    ]
    assert top_layer_targets(llama(3), r".*\.0\.mlp\.up_proj|.*\.2\.mlp\.down_proj", 2) == [
        "model.layers.2.mlp.down_proj"
    ]
    with pytest.raises(ValueError, match=r"picks no module in the top 1 layers of LlamaForCausalLM \(model.layers.2"):
        top_layer_targets(llama(3), r".*layers\.0\..*", 1)


def test_bad_trainable_layers_name_the_option(tiny_llama_path):
    for module in (SFTModule, RLHFModule):
        with pytest.raises(ValueError, match=r"model.trainable_layers must be >= 1 \(or null"):
            module("no-such-model-is-ever-loaded", trainable_layers=0)
    with pytest.raises(ValueError, match="model.trainable_layers must be >= 1"):
        RewardModelModule("no-such-model-is-ever-loaded", trainable_layers=-1)
    message = r"trainable_layers must be between 1 and 2, the number of layers of LlamaForCausalLM \(model.layers\)"
    with pytest.raises(ValueError, match=message):
        load_causal_lm(tiny_llama_path, trainable_layers=3)
    with pytest.raises(ValueError, match=message):
        load_causal_lm(tiny_llama_path, trainable_layers=3, lora=LoraOptions(r=4))


def test_the_option_is_in_every_stages_help(capsys):
    for stage in ("sft", "reward", "rl"):
        with pytest.raises(SystemExit):
            run_stage(stage, ["fit", "--help"])
        text = " ".join(capsys.readouterr().out.split())
        assert "--model.trainable_layers" in text and "Train only the top this many" in text, stage


def check_one_step(model: torch.nn.Module, before: dict[str, torch.Tensor], optimizer: torch.optim.Optimizer) -> None:
    """Frozen weights: unchanged, no gradient, no optimizer state; trainable ones: changed, with optimizer state."""
    state = {id(p) for p in optimizer.state}
    frozen = [(n, p) for n, p in model.named_parameters() if not p.requires_grad]
    trained = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    assert frozen and trained
    for name, p in frozen:
        assert p.grad is None and id(p) not in state and torch.equal(p, before[name]), name
    for name, p in trained:
        assert id(p) in state and not torch.equal(p, before[name]), name


def fit_one_step(module: L.LightningModule, data: L.LightningDataModule) -> None:
    options = {"logger": False, "enable_progress_bar": False, "enable_checkpointing": False}
    L.Trainer(max_steps=1, limit_val_batches=0, enable_model_summary=False, **options).fit(module, data)


def test_sft_trains_only_the_top_layers():
    module = SFTModule("tiny-llama", trainable_layers=1, learning_rate=1e-2, warmup_ratio=0.0, scheduler="constant")
    assert trainable(module.model) == layer_params("model.layers", 1) | {"model.norm.weight"}
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    fit_one_step(module, SFTDataModule("tiny-llama", train_path=f"{EXAMPLES}/sft_tiny.jsonl", batch_size=4))
    check_one_step(module.model, before, module.optimizers().optimizer)


def test_a_reward_model_on_an_encoder_trains_its_top_layers_pooler_and_head():
    module = RewardModelModule("all-minilm-l6-v2", trainable_layers=2, learning_rate=1e-2, warmup_ratio=0.0)
    layers = {int(n.split("layer.")[1].split(".")[0]) for n in trainable(module.model) if ".layer." in n}
    assert layers == {4, 5} and {"classifier.weight", "bert.pooler.dense.weight"} <= trainable(module.model)
    before = {n: p.detach().clone() for n, p in module.model.named_parameters()}
    path = f"{EXAMPLES}/preferences_tiny.jsonl"
    fit_one_step(module, PreferenceDataModule("all-minilm-l6-v2", train_path=path, batch_size=4, max_length=32))
    check_one_step(module.model, before, module.optimizers().optimizer)


def test_rl_trains_the_top_layers_of_the_policy_and_of_the_value_trunk():
    module = tiny_module(trainable_layers=1, value_model="separate")
    policy, value = module.policy, module.models.value_model
    assert trainable(policy) == layer_params("model.layers", 1) | {"model.norm.weight"}
    assert trainable(value) == layer_params("trunk.layers", 1) | {"trunk.norm.weight", "head.weight", "head.bias"}
    before = {n: p.detach().clone() for n, p in module.models.named_parameters()}
    trainer(1).fit(module, prompt_loader())
    check_one_step(module.models, before, module.optimizers().optimizer)


def test_rl_with_lora_puts_adapters_on_the_top_layers_of_policy_and_value_trunk():
    module = tiny_module(trainable_layers=1, lora=LoraOptions(r=4), value_model="separate")
    for model in (module.policy, module.models.value_model):
        adapted = {n for n in trainable(model) if "lora_" in n}
        assert adapted and all(".layers.1." in n for n in adapted), adapted


def test_the_evaluated_policy_carries_the_adapters_the_rl_stage_trained():
    from lit_rlhf.pipeline.common import generator

    config = parse("--config", str(TINY), "--rl.trainable_layers", "1")  # tiny-llama with LoRA
    targets = generator(config, config.rl.model["generation"], reference=True).models.policy.peft_config["default"]
    assert sorted(targets.target_modules) == sorted(top_layer_targets(llama(2), "all-linear", 1))


def test_the_pipeline_checks_trainable_layers_against_the_models_before_it_starts(tmp_path, capsys):
    from lit_rlhf.pipeline import main

    for args, message in (
        (["--rl.trainable_layers", "3"], "rl.trainable_layers must be between 1 and 2, the number of layers of"),
        (["--reward.trainable_layers", "0"], "reward.trainable_layers must be >= 1"),
    ):
        with pytest.raises(SystemExit):
            main(["--config", str(TINY), "--output_dir", str(tmp_path / "run"), *args])
        assert message in capsys.readouterr().err
    assert not (tmp_path / "run" / "stages").exists()
