"""LightningDataModules for the RLHF stages (prompts, preference pairs or rankings, SFT, scored responses for offline
RL) and their row formats."""

from lit_rlhf.data.encoding import encode_prompt, encode_prompt_response, pad_left, pad_right
from lit_rlhf.data.errors import DataFormatError
from lit_rlhf.data.preferences import PreferenceDataModule, read_preferences, write_preferences
from lit_rlhf.data.prompts import PromptDataModule, load_prompts, read_prompts
from lit_rlhf.data.rankings import RankingExample, parse_ranking_row
from lit_rlhf.data.rows import PreferenceExample, SFTExample, parse_preference_row, parse_sft_row
from lit_rlhf.data.scored import ScoredDataModule, ScoredExample, read_scored, write_scored
from lit_rlhf.data.sft import SFTDataModule, read_sft

__all__ = [
    "DataFormatError",
    "PreferenceDataModule",
    "PreferenceExample",
    "PromptDataModule",
    "RankingExample",
    "SFTDataModule",
    "SFTExample",
    "ScoredDataModule",
    "ScoredExample",
    "encode_prompt",
    "encode_prompt_response",
    "load_prompts",
    "pad_left",
    "pad_right",
    "parse_preference_row",
    "parse_ranking_row",
    "parse_sft_row",
    "read_preferences",
    "read_prompts",
    "read_scored",
    "read_sft",
    "write_preferences",
    "write_scored",
]
