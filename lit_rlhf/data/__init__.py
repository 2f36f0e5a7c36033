"""LightningDataModules for the three RLHF stages (prompts, preference pairs, SFT) and their row formats."""

from lit_rlhf.data.formats import (
    DataFormatError,
    PreferenceExample,
    SFTExample,
    encode_prompt_response,
    parse_preference_row,
    parse_sft_row,
)
from lit_rlhf.data.preferences import PreferenceDataModule, read_preferences, write_preferences
from lit_rlhf.data.prompts import PromptDataModule, encode_prompt, load_prompts, read_prompts
from lit_rlhf.data.sft import SFTDataModule, read_sft

__all__ = [
    "DataFormatError",
    "PreferenceDataModule",
    "PreferenceExample",
    "PromptDataModule",
    "SFTDataModule",
    "SFTExample",
    "encode_prompt",
    "encode_prompt_response",
    "load_prompts",
    "parse_preference_row",
    "parse_sft_row",
    "read_preferences",
    "read_prompts",
    "read_sft",
    "write_preferences",
]
