"""Shared test set-up: offline hub, few threads, a session-wide cache for bundled checkpoints."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

# One thread: tiny-model steps are latency-bound, and extra threads only fight over the shared cores.
torch.set_num_threads(1)


@pytest.fixture(scope="session")
def tiny_llama_path() -> str:
    """Folder of the bundled random 2-layer Llama with a character tokenizer (built once)."""
    from lit_rlhf.models import TINY_LLAMA, resolve

    return resolve(TINY_LLAMA)
