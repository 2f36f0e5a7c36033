"""Computed training memory per stage (the formula table in docs/scaling.md): weights, gradients, optimizer states
and activations for a Llama-shaped model, full fine-tuning or LoRA, 32-bit / 8-bit / 4-bit bases.

    python scripts/memory_estimate.py
"""

from __future__ import annotations

from dataclasses import dataclass

GB = 1e9


@dataclass(frozen=True)
class Llama:
    name: str
    layers: int
    hidden: int
    intermediate: int
    heads: int
    kv_heads: int
    vocab: int

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.hidden // self.heads

    @property
    def linear(self) -> int:
        """Parameters in the decoder layers' Linear weights (what bitsandbytes quantises and LoRA adapts)."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return self.layers * (2 * h * h + 2 * h * kv + 3 * h * i)

    @property
    def embedding(self) -> int:
        return self.vocab * self.hidden  # tied with the LM head in both models below

    @property
    def params(self) -> int:
        return self.linear + self.embedding + (2 * self.layers + 1) * self.hidden

    def lora(self, r: int = 16) -> int:
        """LoRA parameters on every Linear of every layer (peft's ``all-linear``): r·(in + out) each."""
        h, kv, i = self.hidden, self.kv_dim, self.intermediate
        return self.layers * r * (2 * (h + h) + 2 * (h + kv) + 3 * (h + i))

    def activations(self, tokens: int, bytes_per_value: int = 4, checkpointing: bool = False) -> float:
        """Saved activations for the backward pass, in bytes, for ``tokens`` = batch × sequence length.

        Counted per layer and token for a Llama block without dropout: both RMSNorms' inputs and outputs (4h), the
        q/k/v projections (h + 2·kv, about 2h) and the attention output (h) — about 8h — plus the MLP's gate, up,
        SiLU(gate) and product (4i). Attention runs fused (SDPA), so no (heads × seq²) score matrix is kept.
        Checkpointing keeps each layer's input (h) plus one layer's full set. The float32 logits and their
        log-softmax add 2·V per token.
        """
        per_layer = 8 * self.hidden + 4 * self.intermediate
        kept = self.layers * self.hidden + per_layer if checkpointing else self.layers * per_layer
        return tokens * bytes_per_value * (kept + 2 * self.vocab)


SMOLLM2 = Llama("SmolLM2-135M", layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, vocab=49152)
LLAMA_1B = Llama("Llama-3.2-1B", layers=16, hidden=2048, intermediate=8192, heads=32, kv_heads=8, vocab=128256)
NF4 = 0.5 + 0.127 / 8  # 4 bits + double-quantised constants (QLoRA §3: 0.127 bits per parameter)


def base_bytes(model: Llama, bits: int) -> float:
    """A frozen base: quantised Linear weights; embeddings (and norms) stay in float32 (peft upcasts them)."""
    per = {32: 4.0, 8: 1.0, 4: NF4}[bits]
    return model.linear * per + (model.params - model.linear) * 4.0


def rows(model: Llama, tokens: int) -> list[tuple[str, float, float, float, float]]:
    """(setting, weights, gradients, optimizer states, activations) in bytes."""
    p, t = model.params, model.lora()
    act, act_ckpt = model.activations(tokens), model.activations(tokens, checkpointing=True)
    adam, adam8 = 8.0, 2.0  # two moments: float32 each, or one byte each (bitsandbytes blockwise)
    out = [
        ("SFT / RM, full, AdamW", 4 * p, 4 * p, adam * p, act),
        ("SFT / RM, full, AdamW8bit", 4 * p, 4 * p, adam8 * p, act),
        ("SFT / RM, LoRA r16, AdamW", 4 * p + 4 * t, 4 * t, adam * t, act),
        ("SFT / RM, QLoRA 4-bit r16, AdamW8bit, ckpt", base_bytes(model, 4) + 4 * t, 4 * t, adam8 * t, act_ckpt),
        # RL: policy + frozen reference + separate value trunk (one forward of each on the rollout, then updates).
        ("RL (PPO), full, AdamW", 4 * p * 3, 4 * p * 2, adam * p * 2, act * 2),
        ("RL (PPO), LoRA r16 (reference = adapter off)", 4 * p * 2 + 8 * t, 8 * t, adam * 2 * t, act * 2),
        ("RL (PPO), 8-bit base + LoRA r16, AdamW8bit, ckpt", base_bytes(model, 8) * 2 + 8 * t, 8 * t, adam8 * 2 * t,
         act_ckpt * 2),
        ("RL (PPO), 4-bit base + LoRA r16, AdamW8bit, ckpt", base_bytes(model, 4) * 2 + 8 * t, 8 * t, adam8 * 2 * t,
         act_ckpt * 2),
    ]  # fmt: skip
    return out


def main() -> None:
    tokens = 8 * 512
    for model in (SMOLLM2, LLAMA_1B):
        print(f"\n{model.name}: {model.params / 1e6:.1f}M parameters, LoRA r16 all-linear {model.lora() / 1e6:.2f}M;"
              f" activations for {tokens} tokens (batch 8 x 512), float32\n")  # fmt: skip
        print("| setting | weights | gradients | optimizer | activations | total (GB) |")
        print("| --- | ---: | ---: | ---: | ---: | ---: |")
        for name, *parts in rows(model, tokens):
            cells = " | ".join(f"{x / GB:.2f}" for x in parts)
            print(f"| {name} | {cells} | {sum(parts) / GB:.2f} |")


if __name__ == "__main__":
    main()
