"""ILQL learns offline: trained on tiny-llama's own scored samples, its decoding (β > 0) earns a clearly higher reward
than the policy that wrote the data, on prompts it never saw (about 10 s on a 2-core CPU)."""

import lightning as L
import torch

from lit_rlhf.data.scored import ScoredDataModule, ScoredExample, write_scored
from lit_rlhf.ilql import ILQLModule
from lit_rlhf.models import TINY_LLAMA, load_causal_lm, load_tokenizer
from lit_rlhf.rewards import CharacterShareReward
from lit_rlhf.rl import GenerationOptions, PolicyGenerator, PolicyModels

TRAIN = ["hello", "say a", "what is up?", "abc", "tell me a story", "x", "list fruits", "ok", "name a colour",
         "count to 3", "why?", "good day", "write", "sing", "yes or no", "pick one"]  # fmt: skip
HELD_OUT = ["how are you", "a poem", "hi there", "describe the sea", "zzz", "go", "tell a joke", "what now"]
SAMPLES = GenerationOptions(max_new_tokens=8, num_samples=16)


def mean_reward(generator: PolicyGenerator, reward, make_processor=None) -> float:
    ids, mask = generator.encode(HELD_OUT)
    torch.manual_seed(1)  # every policy answers with the same random draws
    samples = generator.samples(HELD_OUT, ids, mask, SAMPLES, make_processor)
    return reward(samples.prompts, samples.completions).mean().item()


def test_ilql_decoding_beats_the_policy_that_wrote_the_data(tmp_path, tiny_llama_path):
    reward = CharacterShareReward("a")
    tokenizer = load_tokenizer(TINY_LLAMA, padding_side="left")
    base = PolicyGenerator(PolicyModels(load_causal_lm(TINY_LLAMA).eval()), tokenizer, SAMPLES)
    torch.manual_seed(0)
    ids, mask = base.encode(TRAIN)
    data = base.samples(TRAIN, ids, mask)  # 256 responses of 8 characters; about 1 in 10 holds an "a"
    scores = reward(data.prompts, data.completions)
    # Standardised, as reward-model scores would come: raw shares (mean 0.013) leave the TD error so small that the
    # CQL term (0.1) shapes Q alone and decoding gains nothing (measured: 0.007 at β = 8 against the base's 0.016).
    scores = (scores - scores.mean()) / scores.std()
    rows = [ScoredExample(p, c, float(s)) for p, c, s in zip(data.prompts, data.completions, scores, strict=True)]
    path = write_scored(rows, tmp_path / "scored.jsonl")
    # chat_template: the rows hold raw prompts, rendered here as the generator rendered them for sampling.
    datamodule = ScoredDataModule(TINY_LLAMA, train_path=str(path), batch_size=32, max_length=64, chat_template=True)

    torch.manual_seed(0)
    module = ILQLModule(
        TINY_LLAMA, learning_rate=1e-3, scheduler="constant", warmup_ratio=0.0, alpha=0.1, target_sync_every=1, beta=8.0
    )
    trainer = L.Trainer(
        accelerator="cpu",
        max_steps=200,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
    )
    trainer.fit(module, datamodule)
    module.eval()

    trained = PolicyGenerator(PolicyModels(module.model), tokenizer, SAMPLES)
    before = mean_reward(base, reward)
    lm_only = mean_reward(trained, reward, module.make_processor(beta=0.0))
    ilql = mean_reward(trained, reward, module.make_processor())
    # Seeded runs: base 0.016, the fine-tuned LM alone 0.006, ILQL decoding (β = 8) 0.19 (0.11 to 0.33 over seeds).
    assert ilql > 4 * before and ilql > lm_only + 0.05, (before, lm_only, ilql)
