"""ILQL's value heads on an LM's last hidden state: Q heads (one value per vocabulary token) and a V head, and their
files beside an exported LM (``ilql_heads.safetensors`` and ``ilql_heads.json``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import Tensor, nn

HEADS_FILE = "ilql_heads.safetensors"
"""The heads' weights in an exported ILQL folder."""
CONFIG_FILE = "ilql_heads.json"
"""Their sizes and the decoding scale ``beta`` in an exported ILQL folder."""


def mlp_head(hidden_size: int, out_features: int) -> nn.Sequential:
    """hidden → 2·hidden → ReLU → ``out_features``: a two-layer MLP as the ILQL paper's heads, as wide as trlx's.

    The output layer starts at zero: an untrained head then perturbs decoding by nothing (β·(Q − V) = 0), which
    matters because the target heads that decoding reads follow the trained ones slowly (Polyak α = 0.001).
    """
    head = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size), nn.ReLU(), nn.Linear(2 * hidden_size, out_features))
    nn.init.zeros_(head[2].weight)
    nn.init.zeros_(head[2].bias)
    return head


class QVHeads(nn.Module):
    """K Q heads (hidden → vocabulary) and a V head (hidden → 1), in float32 whatever the trunk's dtype.

    Args:
        q_heads: The Q heads, each ``mlp_head(hidden, vocab)``.
        v_head: The V head, ``mlp_head(hidden, 1)``.
    """

    def __init__(self, q_heads: nn.ModuleList, v_head: nn.Sequential) -> None:
        super().__init__()
        self.q_heads, self.v_head = q_heads, v_head

    @classmethod
    def create(cls, hidden_size: int, vocab_size: int, num_q_heads: int = 2) -> QVHeads:
        """Fresh heads: ``num_q_heads`` Q heads over ``vocab_size`` tokens and a V head."""
        if num_q_heads < 1:
            raise ValueError(f"num_q_heads must be >= 1, got {num_q_heads}.")
        q_heads = nn.ModuleList(mlp_head(hidden_size, vocab_size) for _ in range(num_q_heads))
        return cls(q_heads, mlp_head(hidden_size, 1))

    @property
    def sizes(self) -> dict[str, int]:
        """``hidden_size``, ``vocab_size`` and ``num_q_heads``: what ``create`` needs to rebuild them."""
        first, last = self.q_heads[0][0], self.q_heads[0][2]
        return {"hidden_size": first.in_features, "vocab_size": last.out_features, "num_q_heads": len(self.q_heads)}

    def _input(self, hidden: Tensor) -> Tensor:
        return hidden.to(self.v_head[0].weight.dtype)

    def q_values(self, hidden: Tensor) -> Tensor:
        """Every head's value of every token. Shape: hidden (..., H) -> (K, ..., V)."""
        hidden = self._input(hidden)
        return torch.stack([head(hidden) for head in self.q_heads])

    def action_values(self, hidden: Tensor, actions: Tensor) -> Tensor:
        """Every head's value of the given tokens only: the output layer's rows of those tokens, so no
        vocabulary-sized tensor is built. Shape: hidden (..., H), actions (...) long -> (K, ...)."""
        hidden = self._input(hidden)
        values = []
        for head in self.q_heads:
            inner, out = head[1](head[0](hidden)), head[2]
            values.append((inner * out.weight[actions]).sum(-1) + out.bias[actions])
        return torch.stack(values)

    def values(self, hidden: Tensor) -> Tensor:
        """V of every state. Shape: hidden (..., H) -> (...)."""
        return self.v_head(self._input(hidden)).squeeze(-1)


def save_heads(heads: QVHeads, folder: str | Path, beta: float) -> Path:
    """Write ``heads`` to ``folder/ilql_heads.safetensors`` and their sizes and ``beta`` to ``folder/ilql_heads.json``
    (beside an exported LM); returns ``folder``."""
    from safetensors.torch import save_file

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {name: tensor.detach().float().cpu().contiguous() for name, tensor in heads.state_dict().items()}
    save_file(state, str(folder / HEADS_FILE))
    (folder / CONFIG_FILE).write_text(json.dumps({**heads.sizes, "beta": float(beta)}, indent=2) + "\n")
    return folder


def load_heads(folder: str | Path, device: str | torch.device | None = None) -> tuple[QVHeads, float]:
    """The heads ``save_heads`` wrote to ``folder`` (in eval mode, on ``device``) and the ``beta`` saved with them."""
    from safetensors.torch import load_file

    folder = Path(folder)
    if not (folder / HEADS_FILE).is_file() or not (folder / CONFIG_FILE).is_file():
        raise FileNotFoundError(
            f"{folder} has no ILQL heads ({HEADS_FILE} and {CONFIG_FILE}); export an ILQLModule there first "
            "(HFExportCallback, ILQLModule.export or `lit-rlhf export ilql CKPT OUT`)."
        )
    config = json.loads((folder / CONFIG_FILE).read_text())
    heads = QVHeads.create(config["hidden_size"], config["vocab_size"], config["num_q_heads"])
    heads.load_state_dict(load_file(str(folder / HEADS_FILE)))
    if device is not None:
        heads.to(device)
    return heads.eval().requires_grad_(False), float(config["beta"])
