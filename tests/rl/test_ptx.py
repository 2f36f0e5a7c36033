"""PPO-ptx: the RL update mixes the language-modelling loss of a second text stream into every optimizer step
(``RLHFModule(ptx_coef=...)`` with ``PromptDataModule(ptx_path=...)``), and the stream resumes where it stood."""

import math

import pytest
import torch

from lit_rlhf.data import PromptDataModule
from lit_rlhf.data.ptx import EndlessSamples, StreamLoader
from lit_rlhf.rl import PPO
from lit_rlhf.rl.update import ptx_loss
from tests.rl.support import Outputs, tiny_module, trainer

SFT_TINY = "lit_rlhf/data/examples/sft_tiny.jsonl"


def data(**kwargs) -> PromptDataModule:
    return PromptDataModule("tiny-llama", limit=8, batch_size=4, max_prompt_length=32, **kwargs)


def test_the_stream_is_endless_seeded_and_resumes_after_the_items_drawn():
    stream = EndlessSamples(list(range(5)), seed=3)
    first = [item for item, _ in zip(stream, range(12), strict=False)]
    assert sorted(first[:5]) == sorted(first[5:10]) == list(range(5))  # every pass is a permutation of the rows
    assert first == [item for item, _ in zip(EndlessSamples(list(range(5)), seed=3), range(12), strict=False)]
    loader = StreamLoader(stream, batch_size=2)
    batches = iter(loader)
    drawn = [next(batches).tolist() for _ in range(3)]
    state = loader.state_dict()
    assert state == {"drawn": 6} and sum(drawn, []) == first[:6]
    resumed = StreamLoader(EndlessSamples(list(range(5)), seed=3), batch_size=2)
    resumed.load_state_dict(state)
    assert next(iter(resumed)).tolist() == first[6:8]  # continues, not restarts
    with pytest.raises(ValueError, match="no rows"):
        EndlessSamples([], seed=0)


def test_ptx_batches_come_beside_the_prompts():
    module = data(ptx_path=SFT_TINY, ptx_batch_size=3)
    module.setup("fit")
    batch = next(iter(module.train_dataloader()))[0]
    assert set(batch) == {"prompts", "ptx"} and len(batch["prompts"]["prompt"]) == 4
    assert batch["ptx"]["input_ids"].shape[0] == 3 and (batch["ptx"]["labels"] != -100).any()
    plain = data()
    plain.setup("fit")
    assert "prompt" in next(iter(plain.train_dataloader()))  # without ptx_path: prompt batches as before


def test_ptx_loss_is_logged_and_lowers_the_likelihood_loss_of_the_ptx_text():
    def run(coef: float) -> tuple[float, list[dict]]:
        module = tiny_module(algorithm=PPO(epochs=2, num_minibatches=2), ptx_coef=coef, learning_rate=3e-3)
        datamodule = data(ptx_path=SFT_TINY, ptx_batch_size=4, shuffle=False)
        outputs = Outputs()
        trainer(4, callbacks=[outputs]).fit(module, datamodule=datamodule)
        datamodule.setup("fit")
        batch = next(iter(datamodule.train_dataloader()))[0]["ptx"]
        with torch.no_grad():
            return ptx_loss(module.policy, batch).item(), [o["metrics"] for o in outputs.outputs]

    with_ptx, metrics = run(1.0)
    without, plain_metrics = run(0.0)
    assert all(math.isfinite(m["ptx/loss"]) for m in metrics) and "ptx/loss" not in plain_metrics[0]
    # the random tiny model starts near log(104 characters) = 4.64; the ptx term pulls its loss down
    assert with_ptx < without - 0.1, (with_ptx, without)


def test_ptx_coef_without_ptx_data_fails_naming_the_setting():
    module = tiny_module(ptx_coef=0.5)
    with pytest.raises(ValueError, match="set data.ptx_path"):
        trainer(1).fit(module, datamodule=data())
    with pytest.raises(ValueError, match="ptx_coef must be >= 0"):
        tiny_module(ptx_coef=-1.0)
