"""``VLLMSampler`` (``lit_rlhf.rl.vllm``) against a stand-in for vLLM's ``LLM`` / ``SamplingParams``: what it asks the
engine for. vLLM itself needs CUDA and is not installed here."""

import importlib.machinery
import sys
import types

import pytest
import torch

from lit_rlhf.rl.decoding import Suppress
from tests.rl.support import PROMPTS, prompt_batch, tiny_module


class FakeLLM:
    """Answers every request with the same three token ids and records the sampling parameters."""

    requests: list = []

    def __init__(self, **kwargs) -> None:
        self.kwargs = kwargs

    def apply_model(self, fn) -> None:
        pass

    def generate(self, requests, params, lora_request=None, use_tqdm=False):
        FakeLLM.requests.append(params)
        out = types.SimpleNamespace(token_ids=[5, 6, 7])
        return [types.SimpleNamespace(outputs=[out]) for _ in requests]


@pytest.fixture
def fake_vllm(monkeypatch):
    vllm = types.ModuleType("vllm")
    vllm.__spec__ = importlib.machinery.ModuleSpec("vllm", None)
    vllm.LLM, vllm.SamplingParams = FakeLLM, lambda **kwargs: kwargs
    monkeypatch.setitem(sys.modules, "vllm", vllm)
    FakeLLM.requests = []
    return FakeLLM


def test_special_tokens_are_kept_out_of_vllm_samples_by_a_logit_bias(fake_vllm):
    module = tiny_module(rollout_backend="vllm")
    samples = module.generator.samples(*prompt_batch(PROMPTS).values())
    assert samples.response_ids[0].tolist() == [5, 6, 7]
    params = fake_vllm.requests[0]
    assert len(params) == len(PROMPTS)
    # <pad>, <unk>, <|im_start|> of tiny-llama, as in the native sampler; <|im_end|> is a stop token
    assert params[0]["logit_bias"] == {0: -100.0, 1: -100.0, 2: -100.0}


def test_vllm_samples_special_tokens_when_suppression_is_off_and_refuses_an_algorithms_processor(fake_vllm):
    from lit_rlhf.rl import GenerationOptions

    module = tiny_module(rollout_backend="vllm", generation=GenerationOptions(suppress_special_tokens=False))
    batch = prompt_batch(PROMPTS)
    module.generator.samples(*batch.values())
    assert fake_vllm.requests[0][0]["logit_bias"] is None
    processor = Suppress(torch.tensor([0]), then=lambda ids, scores: scores)
    with pytest.raises(ValueError, match="vLLM cannot run"):
        module.generator.sampler.sample(
            module.models.policy, batch["input_ids"], batch["attention_mask"], module.generation, processor
        )
