"""Optional vLLM rollout backend: sampling by a colocated vLLM engine whose weights follow the policy after each
update (``pip install lit-rlhf[vllm]``, CUDA only). Written against vLLM's documented ``LLM`` API; not run in CI."""

from __future__ import annotations

import importlib.util
import os
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from transformers import LogitsProcessor, PreTrainedTokenizerBase

from lit_rlhf.models import LoraOptions
from lit_rlhf.rl.decoding import GenerationOptions, Sampler, Suppress

INSTALL_HINT = "rollout_backend: vllm needs vLLM on a CUDA machine: `pip install lit-rlhf[vllm]`."


def require_vllm() -> None:
    """Raise a ``ModuleNotFoundError`` that says how to install vLLM when it is missing."""
    if importlib.util.find_spec("vllm") is None:
        raise ModuleNotFoundError(INSTALL_HINT)


@dataclass(frozen=True)
class VLLMOptions:
    """Settings of the colocated vLLM engine (one per training process, on that process's GPU)."""

    gpu_memory_utilization: float = 0.3
    """Share of the GPU's memory vLLM may take for weights and KV cache; the rest is left to training."""
    max_model_len: int | None = None
    """Longest prompt + response vLLM plans its KV cache for; None uses the model's maximum."""
    dtype: str = "auto"
    """Weight dtype inside vLLM (``auto``, ``bfloat16``, ``float16``)."""
    enforce_eager: bool = False
    """Skip CUDA graph capture: slower decoding, faster start and less memory."""
    sleep_during_update: bool = False
    """Free vLLM's weights and KV cache while the policy trains (``LLM.sleep`` / ``wake_up``, vLLM's sleep mode)."""

    def __post_init__(self) -> None:
        if not 0.0 < self.gpu_memory_utilization < 1.0:
            raise ValueError(f"vllm.gpu_memory_utilization must be in (0, 1), got {self.gpu_memory_utilization}.")


class VLLMSampler(Sampler):
    """Samples with a colocated vLLM engine and keeps its weights equal to the policy's.

    The engine starts at the first ``sample`` and takes the policy's weights then (a resumed run's, a LoRA adapter).
    Without LoRA the policy's weights are loaded into vLLM's model in place (``LLM.apply_model`` →
    ``model.load_weights``) after every update. With LoRA, vLLM serves the frozen base and each update's adapter is
    saved to a temporary folder and sent as a new ``LoRARequest`` (vLLM caches adapters by id, so each push gets a new
    one). Only token ids come back: log-probs are recomputed by the policy's own forward, as with the other backends.

    Args:
        tokenizer: The policy's tokenizer.
        stop_token_ids: Tokens that end a response.
        model_path: Local folder or hub id of the policy's initial weights (what vLLM loads).
        options: Engine settings.
        lora: The policy's LoRA settings, or None.
        world_size: Training processes; above 1 each one drives its own engine (vLLM's ``external_launcher``).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        stop_token_ids: list[int],
        model_path: str,
        options: VLLMOptions,
        lora: LoraOptions | None,
        world_size: int = 1,
    ) -> None:
        require_vllm()
        super().__init__(tokenizer, stop_token_ids)
        self.model_path, self.options, self.lora, self.world_size = model_path, options, lora, world_size
        self.llm: Any = None
        self._lora_request = None
        self._pushes = 0
        self._adapter_dir = Path(tempfile.mkdtemp(prefix="lit-rlhf-vllm-"))

    def _start(self) -> None:
        # In-process engine: `apply_model` then touches the same CUDA tensors instead of pickling them to a worker.
        os.environ.setdefault("VLLM_ENABLE_V1_MULTIPROCESSING", "0")
        from vllm import LLM

        kwargs: dict[str, Any] = dict(
            model=self.model_path,
            gpu_memory_utilization=self.options.gpu_memory_utilization,
            max_model_len=self.options.max_model_len,
            dtype=self.options.dtype,
            enforce_eager=self.options.enforce_eager,
            enable_sleep_mode=self.options.sleep_during_update,
        )
        if self.lora is not None:
            kwargs.update(enable_lora=True, max_lora_rank=self.lora.r, max_loras=1)
        if self.world_size > 1:
            kwargs["distributed_executor_backend"] = "external_launcher"
        self.llm = LLM(**kwargs)

    def sample(
        self,
        policy: nn.Module,
        prompt_ids: Tensor,
        prompt_mask: Tensor,
        options: GenerationOptions,
        processor: LogitsProcessor | None = None,
    ) -> Tensor:
        """Sample one response per row; responses right-padded with the pad id (the layout of HF ``generate``).

        Shape: (B, P), (B, P) left-padded -> (B, P+T) sequences, T <= max_new_tokens.
        """
        from vllm import SamplingParams

        # The special tokens that are never sampled reach vLLM as a logit bias (its own logits processors are not
        # Python callables of ours); -100 makes a token e^-100 times as likely: never, in practice.
        logit_bias = None
        if isinstance(processor, Suppress):
            logit_bias = dict.fromkeys(processor.token_ids.tolist(), -100.0)
            processor = processor.then
        if processor is not None:
            raise ValueError(
                "This algorithm samples through a logits processor, which vLLM cannot run: use rollout_backend: "
                "native or hf."
            )
        if self.llm is None:
            self._start()
            self.refresh(policy)
        # Seeds drawn from torch's generator keep the rollout_seed / per-rank reseeding meaningful for vLLM too.
        seeds = torch.randint(0, 2**31 - 1, (prompt_ids.shape[0],)).tolist()
        params = [
            SamplingParams(
                n=1,
                max_tokens=options.max_new_tokens,
                temperature=options.temperature if options.do_sample else 0.0,
                top_k=options.top_k if options.do_sample and options.top_k > 0 else -1,
                top_p=options.top_p if options.do_sample else 1.0,
                stop_token_ids=list(self.stop_token_ids),
                stop=list(options.stop_strings) or None,
                include_stop_str_in_output=True,
                skip_special_tokens=False,
                logit_bias=logit_bias,
                seed=seed,
            )
            for seed in seeds
        ]
        requests = [
            {"prompt_token_ids": ids[mask.bool()].tolist()}
            for ids, mask in zip(prompt_ids.cpu(), prompt_mask.cpu(), strict=True)
        ]
        outputs = self.llm.generate(requests, params, lora_request=self._lora_request, use_tqdm=False)
        responses = [list(out.outputs[0].token_ids) for out in outputs]
        length = max(1, max(len(r) for r in responses))
        padded = torch.full((len(responses), length), self.tokenizer.pad_token_id, dtype=prompt_ids.dtype)
        for row, tokens in enumerate(responses):
            padded[row, : len(tokens)] = torch.tensor(tokens, dtype=prompt_ids.dtype)
        return torch.cat([prompt_ids, padded.to(prompt_ids.device)], dim=1)

    @contextmanager
    def released(self) -> Iterator[None]:
        """vLLM's GPU memory is released while the policy trains (with ``sleep_during_update``)."""
        asleep = self.llm is not None and self.options.sleep_during_update
        if asleep:
            self.llm.sleep(level=1)
        try:
            yield
        finally:
            if asleep:
                self.llm.wake_up()

    @torch.no_grad()
    def refresh(self, policy: nn.Module) -> None:
        """Make vLLM sample from ``policy``'s current weights (after every update)."""
        if self.llm is None:
            return  # the engine takes the weights when it starts
        self._pushes += 1
        if self.lora is not None:
            from vllm.lora.request import LoRARequest

            folder = self._adapter_dir / f"update-{self._pushes}"
            policy.save_pretrained(folder, selected_adapters=["default"])
            # peft saves a non-default selection under its name; "default" lands in the folder itself.
            self._lora_request = LoRARequest(f"policy-{self._pushes}", self._pushes, str(folder))
            return
        weights = [(name, tensor.detach()) for name, tensor in policy.state_dict().items()]
        self.llm.apply_model(lambda model: model.load_weights(weights))
