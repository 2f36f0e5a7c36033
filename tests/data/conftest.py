"""Fixtures of the data tests."""

import pytest

from lit_rlhf.models import load_tokenizer


@pytest.fixture(scope="module")
def tok(tiny_llama_path):
    """The tiny Llama's character tokenizer (ids in ``tests.data.test_support``), right padding."""
    return load_tokenizer(tiny_llama_path, padding_side="right")
