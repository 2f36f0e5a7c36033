"""lit_rlhf: PyTorch Lightning modules for RLHF — SFT, Bradley–Terry reward models, PPO / A2C / NLPO / GRPO /
RLOO / REINFORCE++ with KL control, and DPO and its variants offline."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

__version__ = "0.1.0"

# Public name -> module. Resolved on first access so `import lit_rlhf.models` does not pay for Lightning's import.
_EXPORTS = {
    "SFTModule": "lit_rlhf.sft",
    "ILQLModule": "lit_rlhf.ilql",
    "make_ilql_processor": "lit_rlhf.ilql",
    "RewardModelModule": "lit_rlhf.reward",
    "RewardModel": "lit_rlhf.reward",
    "bradley_terry_loss": "lit_rlhf.reward",
    "DPOModule": "lit_rlhf.dpo",
    "preference_loss": "lit_rlhf.dpo",
    "RLHFModule": "lit_rlhf.rl",
    "PolicyOptimizer": "lit_rlhf.rl",
    "PPO": "lit_rlhf.rl",
    "A2C": "lit_rlhf.rl",
    "NLPO": "lit_rlhf.rl",
    "RLOO": "lit_rlhf.rl",
    "GRPO": "lit_rlhf.rl",
    "ReinforcePP": "lit_rlhf.rl",
    "PolicyGenerator": "lit_rlhf.rl",
    "PolicyModels": "lit_rlhf.rl",
    "FixedKL": "lit_rlhf.rl",
    "AdaptiveKL": "lit_rlhf.rl",
    "GenerationOptions": "lit_rlhf.rl",
    "PreferenceDataModule": "lit_rlhf.data",
    "PromptDataModule": "lit_rlhf.data",
    "SFTDataModule": "lit_rlhf.data",
    "ScoredDataModule": "lit_rlhf.data",
    "write_scored": "lit_rlhf.data",
    "DataFormatError": "lit_rlhf.data",
    "read_preferences": "lit_rlhf.data",
    "write_preferences": "lit_rlhf.data",
    "load_prompts": "lit_rlhf.data",
    "LoraOptions": "lit_rlhf.models",
    "load_causal_lm": "lit_rlhf.models",
    "load_tokenizer": "lit_rlhf.models",
    "load_sequence_classifier": "lit_rlhf.models",
    "export_pretrained": "lit_rlhf.finetuning",
    "VaderJudge": "lit_rlhf.judges",
    "BradleyTerryAnnotator": "lit_rlhf.judges",
    "HFExportCallback": "lit_rlhf.callbacks",
    "MetricsHistory": "lit_rlhf.callbacks",
    "SampleTable": "lit_rlhf.callbacks",
}

__all__ = sorted(_EXPORTS)

if TYPE_CHECKING:  # pragma: no cover
    from lit_rlhf.callbacks import HFExportCallback, MetricsHistory, SampleTable  # noqa: F401
    from lit_rlhf.data import (  # noqa: F401
        DataFormatError,
        PreferenceDataModule,
        PromptDataModule,
        ScoredDataModule,
        SFTDataModule,
        load_prompts,
        read_preferences,
        write_preferences,
        write_scored,
    )
    from lit_rlhf.dpo import DPOModule, preference_loss  # noqa: F401
    from lit_rlhf.finetuning import export_pretrained  # noqa: F401
    from lit_rlhf.ilql import ILQLModule, make_ilql_processor  # noqa: F401
    from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge  # noqa: F401
    from lit_rlhf.models import (  # noqa: F401
        LoraOptions,
        load_causal_lm,
        load_sequence_classifier,
        load_tokenizer,
    )
    from lit_rlhf.reward import RewardModel, RewardModelModule, bradley_terry_loss  # noqa: F401
    from lit_rlhf.rl import (  # noqa: F401
        A2C,
        GRPO,
        NLPO,
        PPO,
        RLOO,
        AdaptiveKL,
        FixedKL,
        GenerationOptions,
        PolicyGenerator,
        PolicyModels,
        PolicyOptimizer,
        ReinforcePP,
        RLHFModule,
    )
    from lit_rlhf.sft import SFTModule  # noqa: F401


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'lit_rlhf' has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
