"""What the stages share (``lit_rlhf.pipeline.common``): annotator and judge choice, precision, the generator."""

import torch

from lit_rlhf.judges import BradleyTerryAnnotator
from lit_rlhf.pipeline.common import annotator_for, gold_judge_for
from tests.pipeline.support import parse


def test_a_plain_judge_becomes_a_noiseless_annotator():
    config = parse("--collect.annotator", "lit_rlhf.rewards.SentimentReward")
    annotator = annotator_for(config)
    assert isinstance(annotator, BradleyTerryAnnotator) and annotator.temperature == 0.0
    assert gold_judge_for(config) is not None
    (preference,) = annotator.compare(["p"], ["I hate this."], ["What a lovely day!"])
    assert preference.chosen == "What a lovely day!"


def test_precision_reaches_the_trainers_and_collect_sampling():
    from lit_rlhf.pipeline.common import generator, make_trainer, sampling_precision
    from lit_rlhf.rl import GenerationOptions

    config = parse("--policy", "tiny-llama", "--precision", "bf16-mixed")
    assert make_trainer(config, config.rl.trainer).precision == "bf16-mixed"
    # a stage's own trainer precision wins
    assert make_trainer(config, {**config.rl.trainer, "precision": "32-true"}).precision == "32-true"
    policy = generator(config, GenerationOptions(max_new_tokens=4))
    assert policy.models.reference is None  # collect samples, nothing more
    with sampling_precision(config, policy):
        assert torch.is_autocast_enabled("cpu")
        ids = policy.tokenizer(["ab"], return_tensors="pt")["input_ids"]
        assert policy.models.policy(input_ids=ids).logits.dtype == torch.float32  # the head stays float32
    full = parse("--policy", "tiny-llama")
    with sampling_precision(full, generator(full, GenerationOptions(max_new_tokens=4))):
        assert not torch.is_autocast_enabled("cpu")
