"""Reward models (``lit_rlhf.reward``): the Bradley–Terry loss by hand, the pair and ranking forwards over collated
batches, a tiny fit on rankings, and the ``RewardModel`` scorer, which gives the trained module's scores whatever its
batching."""

import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification

from lit_rlhf.data.encoding import PreferenceCollator, RankingCollator, encode_prompt_response, encode_prompt_responses
from lit_rlhf.models import LoraOptions
from lit_rlhf.reward import RewardModel, RewardModelModule, bradley_terry_loss


def test_bradley_terry_loss_by_hand():
    chosen = torch.tensor([2.0, 0.0])
    rejected = torch.tensor([1.0, 0.0])
    # diffs [1, 0]: -log σ(1) = log(1 + e^-1) = 0.313262, -log σ(0) = log 2 = 0.693147; mean 0.503204
    expected = (math.log(1 + math.exp(-1)) + math.log(2)) / 2
    assert math.isclose(bradley_terry_loss(chosen, rejected).item(), expected, rel_tol=1e-6)


def test_bradley_terry_margin_and_centering_by_hand():
    chosen = torch.tensor([2.0])
    rejected = torch.tensor([1.0])
    margin = torch.tensor([1.0])
    # diff - margin = 0 -> log 2 = 0.693147; centering 0.1 * (2 + 1)^2 = 0.9; total 1.593147
    loss = bradley_terry_loss(chosen, rejected, margin, center_coef=0.1)
    assert math.isclose(loss.item(), math.log(2) + 0.9, rel_tol=1e-6)


def test_bradley_terry_gradient_pushes_chosen_up():
    chosen = torch.tensor([0.0], requires_grad=True)
    rejected = torch.tensor([0.0], requires_grad=True)
    bradley_terry_loss(chosen, rejected).backward()
    # d/dr_c of -log σ(r_c - r_r) at 0 is -(1 - σ(0)) = -0.5; the rejected one gets +0.5
    assert chosen.grad.item() == -0.5 and rejected.grad.item() == 0.5


@pytest.mark.parametrize("backbone", ["tiny-llama", "all-minilm-l6-v2"])
def test_reward_model_scores_match_the_trained_module(backbone, tmp_path):
    module = RewardModelModule(backbone=backbone, lora=LoraOptions(r=4, alpha=8) if backbone == "tiny-llama" else None)
    module.eval()
    prompts = ["\n\nHuman: hi\n\nAssistant:", "\n\nHuman: tell me a joke\n\nAssistant:"]
    replies = [" Hello, how can I help?", " No."]
    tok = module.tokenizer
    expected = []
    with torch.no_grad():
        for p, r in zip(prompts, replies, strict=True):
            ids = torch.tensor([encode_prompt_response(tok, p, r, 64)])
            expected.append(module(ids, torch.ones_like(ids)).item())
    path = module.export(tmp_path / "rm")
    assert AutoModelForSequenceClassification.from_pretrained(path).config.num_labels == 1
    scores = RewardModel(str(path), batch_size=1, max_length=64)(prompts, replies)
    assert scores.shape == (2,) and scores.dtype == torch.float32
    torch.testing.assert_close(scores, torch.tensor(expected), rtol=1e-4, atol=1e-4)


def test_reward_model_rejects_mismatched_lengths(tmp_path):
    module = RewardModelModule(backbone="tiny-llama")
    path = module.export(tmp_path / "rm")
    with pytest.raises(ValueError, match="2 prompts but 1 completions"):
        RewardModel(str(path))(["a", "b"], ["c"])


@pytest.mark.parametrize("backbone", ["tiny-llama", "all-minilm-l6-v2"])
def test_pair_rewards_score_a_collated_batch_as_each_sequence_alone(backbone):
    # PreferenceCollator pads chosen and rejected to one width: one forward over both, no re-padding.
    module = RewardModelModule(backbone=backbone).eval()
    tok = module.tokenizer
    prompt = "\n\nHuman: hi\n\nAssistant:"
    chosen_ids = [encode_prompt_response(tok, prompt, reply, 64) for reply in (" Hello!", " No.")]
    rejected_ids = [encode_prompt_response(tok, prompt, reply, 64) for reply in (" Go away, I am busy.", "")]
    items = [
        {"chosen_input_ids": c, "rejected_input_ids": r, "margin": 0.0}
        for c, r in zip(chosen_ids, rejected_ids, strict=True)
    ]
    batch = PreferenceCollator(tok.pad_token_id)(items)

    def alone(sequences: list[list[int]]) -> torch.Tensor:
        return torch.tensor(
            [module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for s in sequences]
        )

    with torch.no_grad():
        chosen, rejected = module._pair_rewards(batch)
        torch.testing.assert_close(chosen, alone(chosen_ids), rtol=1e-4, atol=1e-4)
        torch.testing.assert_close(rejected, alone(rejected_ids), rtol=1e-4, atol=1e-4)
    narrower = {key: batch[key][:, :-1] for key in ("rejected_input_ids", "rejected_attention_mask")}
    with pytest.raises(ValueError, match="must be padded to one width"):
        module._pair_rewards(batch | narrower)


def test_reward_model_scores_do_not_depend_on_the_batch_padding(tmp_path):
    module = RewardModelModule(backbone="tiny-llama")
    scorer = RewardModel(str(module.export(tmp_path / "rm")), batch_size=1, max_length=64, device="cpu")
    prompts = ["hi", "tell me a long story please", "", "why"]
    replies = [" ok", " no", " a much longer reply than the others", " b"]
    alone = scorer(prompts, replies)
    scorer.batch_size = 3  # a batch of 3 and one of 1, right-padded with pad_right
    torch.testing.assert_close(scorer(prompts, replies), alone, rtol=1e-4, atol=1e-4)


def test_ranking_rewards_score_each_response_as_alone_and_fill_their_slots():
    module = RewardModelModule(backbone="tiny-llama").eval()
    tok = module.tokenizer
    responses = [[" Hello!", " No.", " Go away."], [" yes", ""]]
    encoded = [encode_prompt_responses(tok, "hi", group, 64) for group in responses]
    items = [{"input_ids": ids, "scores": list(range(len(ids))), "margin": 0.0} for ids in encoded]
    batch = RankingCollator(tok.pad_token_id)(items)
    with torch.no_grad():
        rewards = module._ranking_rewards(batch)
        alone = [module(torch.tensor([s]), torch.ones(1, len(s), dtype=torch.long)).item() for g in encoded for s in g]
        predicted = module.predict_step(batch, 0)["rewards"]
    assert rewards.shape == (2, 3) and rewards[1, 2].item() == 0.0
    torch.testing.assert_close(rewards[batch["response_mask"]], torch.tensor(alone), rtol=1e-4, atol=1e-4)
    assert math.isnan(predicted[1, 2].item()) and torch.equal(predicted[0], rewards[0])


@pytest.mark.parametrize("ranking_loss", ["pairwise", "plackett_luce"])
def test_pairs_as_rankings_of_two_give_the_pair_loss_and_accuracy(ranking_loss):
    module = RewardModelModule(backbone="tiny-llama", center_rewards_coefficient=0.1, ranking_loss=ranking_loss)
    module.eval()
    tok = module.tokenizer
    chosen = [encode_prompt_response(tok, "hi", r, 64) for r in (" Hello!", " No.")]
    rejected = [encode_prompt_response(tok, "hi", r, 64) for r in (" Go away, I am busy.", "")]
    pairs = PreferenceCollator(tok.pad_token_id)(
        [{"chosen_input_ids": c, "rejected_input_ids": r, "margin": 0.0} for c, r in zip(chosen, rejected, strict=True)]
    )
    rankings = RankingCollator(tok.pad_token_id)(
        [{"input_ids": [c, r], "scores": [1.0, 0.0], "margin": 0.0} for c, r in zip(chosen, rejected, strict=True)]
    )
    with torch.no_grad():
        pair_loss, pair_gaps = module._loss(pairs)
        ranking_loss_value, ranking_gaps = module._loss(rankings)
    torch.testing.assert_close(ranking_loss_value, pair_loss, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(ranking_gaps, pair_gaps, rtol=1e-5, atol=1e-5)


def test_plackett_luce_refuses_pair_margins_and_unknown_losses_fail():
    module = RewardModelModule(backbone="tiny-llama", ranking_loss="plackett_luce")
    batch = RankingCollator(0)([{"input_ids": [[14], [15]], "scores": [1.0, 0.0], "margin": 1.0}])
    with pytest.raises(ValueError, match="plackett_luce has no margin"):
        module._loss(batch)
    with pytest.raises(ValueError, match="ranking_loss must be 'pairwise' or 'plackett_luce', got 'listwise'"):
        RewardModelModule(backbone="tiny-llama", ranking_loss="listwise")


@pytest.mark.parametrize("ranking_loss", ["pairwise", "plackett_luce"])
def test_a_tiny_reward_model_learns_rankings(ranking_loss, tmp_path):
    import json

    import lightning as L

    from lit_rlhf.data import PreferenceDataModule

    rows = [
        {"prompt": "Q: mood?", "responses": [" sad", " great", " fine", " bad"], "ranking": [1, 2, 3, 0]},
        {"prompt": "Q: day?", "responses": [" good", " awful"], "scores": [1.0, 0.0]},
        {"prompt": "Q: food?", "responses": [" tasty", " ok", " gross"], "scores": [2.0, 1.0, 1.0]},
    ]
    path = tmp_path / "rankings.jsonl"
    path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    L.seed_everything(0, verbose=False)
    module = RewardModelModule(
        backbone="tiny-llama", learning_rate=3e-3, warmup_ratio=0.0, scheduler="constant", ranking_loss=ranking_loss
    )
    data = PreferenceDataModule("tiny-llama", train_path=str(path), val_path=str(path), batch_size=3)
    trainer = L.Trainer(
        max_steps=30, logger=False, enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False
    )
    before = trainer.validate(module, data, verbose=False)[0]
    trainer.fit(module, data)
    after = trainer.validate(module, data, verbose=False)[0]
    # 6 + 1 + 2 = 9 comparisons, each counted once in the accuracy; the training rows are learnt.
    assert after["val/loss"] < before["val/loss"]
    assert after["val/accuracy"] == 1.0 and after["val/margin"] > 0
