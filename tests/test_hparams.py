"""Plain hyperparameters (``lit_rlhf.hparams``): components described as class_path / init_args, so checkpoints of
modules built in Python hold no pickled objects and rebuild their components."""

import functools

import torch

from lit_rlhf.hparams import Configurable, to_plain
from lit_rlhf.judges import BradleyTerryAnnotator, VaderJudge
from lit_rlhf.models import LoraOptions
from lit_rlhf.rl import NLPO, AdaptiveKL, GenerationOptions
from lit_rlhf.sft import SFTModule


def test_components_options_functions_and_factories_become_plain_data():
    annotator = BradleyTerryAnnotator(VaderJudge(), temperature=0.2)
    assert to_plain(annotator) == {
        "class_path": "lit_rlhf.judges.BradleyTerryAnnotator",
        "init_args": {"judge": {"class_path": "lit_rlhf.judges.VaderJudge", "init_args": {}}, "temperature": 0.2},
    }
    # NLPO forwards PPO's arguments as **ppo: they are recorded by name, as jsonargparse expects them.
    assert to_plain(NLPO(top_mask=0.5, epochs=2))["init_args"] == {"top_mask": 0.5, "epochs": 2}
    assert to_plain(AdaptiveKL(0.1, 3.0, 100))["init_args"] == {"init_coef": 0.1, "target": 3.0, "horizon": 100}
    assert to_plain(GenerationOptions(max_new_tokens=4))["max_new_tokens"] == 4  # a dataclass: its fields
    assert to_plain(LoraOptions(r=4))["r"] == 4
    assert to_plain(functools.partial(torch.optim.AdamW, weight_decay=0.0)) == {
        "class_path": "torch.optim.adamw.AdamW",
        "init_args": {"weight_decay": 0.0},
    }
    assert to_plain(torch.nn.functional.relu) == "torch.nn.functional.relu"


def test_what_cannot_be_described_is_marked():
    class Local(Configurable):  # defined inside a function: not importable by name
        def __init__(self, x: int = 1) -> None:
            self.x = x

    undescribable = to_plain(lambda: 0)
    assert to_plain(object()) is undescribable
    assert to_plain(Local(2)) == {"class_path": f"{__name__}.{Local.__qualname__}", "init_args": {"x": 2}}
    assert to_plain([1, lambda: 0]) is undescribable


def test_a_supervised_module_with_lora_checkpoints_without_pickles(tmp_path):
    import lightning as L

    module = SFTModule(model="tiny-llama", lora=LoraOptions(r=4))
    trainer = L.Trainer(max_epochs=0, logger=False, enable_checkpointing=False, enable_progress_bar=False)
    trainer.strategy.connect(module)
    trainer.save_checkpoint(tmp_path / "sft.ckpt")
    hparams = torch.load(tmp_path / "sft.ckpt", weights_only=True)["hyper_parameters"]
    assert hparams["lora"]["r"] == 4
    loaded = SFTModule.load_from_checkpoint(tmp_path / "sft.ckpt", weights_only=True)
    assert loaded.model.peft_config["default"].r == 4  # rebuilt with its LoRA adapter
