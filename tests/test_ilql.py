"""ILQL (``lit_rlhf.ilql``, ``ilql_losses``, ``ilql_heads``, ``ilql_decoding``): the loss terms and the Polyak update
on numbers worked out by hand, the module's fit on tiny-llama, its export, and the decoding processor (its cache
against a recompute, left padding, β = 0) through the samplers."""

import math

import lightning as L
import pytest
import torch

from lit_rlhf.data.scored import ScoredDataModule
from lit_rlhf.ilql import ILQLModule, make_ilql_processor
from lit_rlhf.ilql_decoding import ILQLLogitsProcessor
from lit_rlhf.ilql_heads import QVHeads, load_heads
from lit_rlhf.ilql_losses import (
    cql_loss,
    expectile_loss,
    lm_loss,
    perturbed_scores,
    polyak_update,
    q_loss,
    terminal_rewards,
)
from lit_rlhf.models import TINY_LLAMA, load_tokenizer
from lit_rlhf.rl import GenerationOptions, PolicyGenerator, PolicyModels
from lit_rlhf.rl.decoding import HFSampler
from tests.data.test_support import EXAMPLES

LN2, LN3 = math.log(2), math.log(3)


def close(actual, expected, tol=1e-5):
    torch.testing.assert_close(torch.as_tensor(actual).float(), torch.as_tensor(expected).float(), atol=tol, rtol=0)


# ---------------------------------------------------------------------------------------------------------------------
# The math


def test_terminal_rewards_pay_on_the_last_response_token():
    mask = torch.tensor([[0.0, 1.0, 1.0, 0.0], [1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]])
    rewards, done = terminal_rewards(torch.tensor([2.0, 3.0, 5.0]), mask)
    # Row 0's response is tokens 1-2 (then padding): r = 2 on token 2; row 1 ends at token 3; row 2 has no response.
    close(rewards, [[0, 0, 2, 0], [0, 0, 0, 3], [0, 0, 0, 0]])
    close(done, [[0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])


def test_q_loss_regresses_every_head_onto_the_td_target():
    rewards, done = torch.tensor([[0.0, 0.0, 1.0, 0.0]]), torch.tensor([[0.0, 0.0, 1.0, 0.0]])
    next_v = torch.tensor([[0.5, 2.0, 9.0, 7.0]], requires_grad=True)
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0]])
    q = torch.tensor([[[0.25, 0.0, 1.0, 100.0]], [[1.25, 1.0, 3.0, 100.0]]], requires_grad=True)
    # γ = 0.5: targets [0 + 0.5·0.5, 0 + 0.5·2, 1 + 0.5·9·(1 − 1)] = [0.25, 1, 1] (token 3 is masked out)
    # head 1: errors² [0, 1, 0] -> mean 1/3; head 2: [1, 0, 4] -> 5/3; sum 2
    loss = q_loss(q, rewards, next_v, done, mask, gamma=0.5)
    close(loss, 2.0)
    loss.backward()
    assert next_v.grad is None  # the target is detached: V learns from its own loss only
    close(q.grad[0, 0], [0.0, -2 / 3, 0.0, 0.0])  # d/dQ of (Q − y)²/3 = 2(Q − y)/3


def test_expectile_loss_weighs_under_and_over_estimates_by_tau():
    target_q = torch.tensor([[[1.0, 0.0, 2.0]], [[3.0, -1.0, 2.0]]], requires_grad=True)
    v = torch.tensor([[0.0, 0.0, 3.0]])
    # min over heads Q̂ = [1, -1, 2]; u = Q̂ − V = [1, -1, -1]; τ = 0.7: weights [0.7, 0.3, 0.3]
    # w·u² = [0.7, 0.3, 0.3] -> mean 1.3 / 3
    loss = expectile_loss(target_q, v, torch.ones(1, 3), tau=0.7)
    close(loss, 1.3 / 3)
    assert not loss.requires_grad  # nothing reaches the target heads (and V here is a constant)
    close(expectile_loss(target_q, v, torch.ones(1, 3), tau=0.5), 1.5 / 3)  # τ = ½: half the squared error


def test_cql_loss_is_the_cross_entropy_of_q_as_logits():
    # Head 1: Q(s, ·) = [0, 0, ln 2] at both tokens -> logsumexp = ln 4; taken token 2: ln 4 − ln 2 = ln 2,
    # token 0: ln 4 − 0 = 2 ln 2; mean 1.5 ln 2. Head 2: Q = 0 everywhere -> ln 3 per token. Sum 1.5 ln 2 + ln 3.
    head1 = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    q_values = torch.stack([head1, torch.zeros(1, 2, 3)])
    actions, mask = torch.tensor([[2, 0]]), torch.ones(1, 2)
    close(cql_loss(q_values, actions, mask), 1.5 * LN2 + LN3)
    close(cql_loss(q_values[:1], actions, torch.tensor([[1.0, 0.0]])), LN2)  # the masked token does not count


def test_lm_loss_is_the_mean_nll_of_the_response_tokens():
    logits = torch.tensor([[[0.0, 0.0, LN2], [0.0, 0.0, LN2]]])
    # p = [¼, ¼, ½]: token 2 costs ln 2, token 0 costs ln 4 = 2 ln 2 -> mean 1.5 ln 2
    close(lm_loss(logits, torch.tensor([[2, 0]]), torch.ones(1, 2)), 1.5 * LN2)


def test_polyak_update_moves_the_targets_a_share_alpha():
    target, source = torch.tensor([0.0, 10.0]), torch.tensor([1.0, 20.0])
    polyak_update([target], [source], alpha=0.1)
    close(target, [0.1, 11.0])  # 0.9·0 + 0.1·1, 0.9·10 + 0.1·20
    polyak_update([target], [source], alpha=1.0)
    close(target, source)


def test_perturbed_scores_add_beta_times_the_advantage():
    scores = torch.tensor([[1.0, 2.0, 3.0, float("-inf")]])
    q = torch.tensor([[[0.0, 1.0, 5.0, 0.0]], [[2.0, 0.0, 4.0, 0.0]]])
    v = torch.tensor([1.0])
    # min over heads [0, 0, 4, 0] − V 1 = [-1, -1, 3, -1]; β = ½: [1 − ½, 2 − ½, 3 + 1.5, -inf]
    close(perturbed_scores(scores, q, v, beta=0.5), [[0.5, 1.5, 4.5, float("-inf")]])
    assert torch.equal(perturbed_scores(scores, q, v, beta=0.0), scores)


def test_heads_score_the_taken_tokens_without_the_vocabulary():
    torch.manual_seed(0)
    heads = QVHeads.create(hidden_size=4, vocab_size=7, num_q_heads=2)
    assert heads.q_values(torch.randn(3, 4)).abs().max() == 0  # untrained heads perturb nothing
    for head in heads.q_heads:
        torch.nn.init.normal_(head[2].weight)
    hidden, actions = torch.randn(2, 3, 4), torch.randint(0, 7, (2, 3))
    full = heads.q_values(hidden)
    assert full.shape == (2, 2, 3, 7) and heads.values(hidden).shape == (2, 3)
    expected = full.gather(-1, actions.expand(2, 2, 3).unsqueeze(-1)).squeeze(-1)
    close(heads.action_values(hidden, actions), expected)


@pytest.mark.parametrize(
    ("argument", "value", "message"),
    [("tau", 1.0, "tau"), ("gamma", 0.0, "gamma"), ("cql_scale", -1.0, "cql_scale"), ("alpha", 0.0, "alpha"),
     ("target_sync_every", 0, "target_sync_every"), ("beta", -1.0, "beta")],
)  # fmt: skip
def test_bad_hyperparameters_fail_before_loading(argument, value, message):
    with pytest.raises(ValueError, match=f"model.{message}"):
        ILQLModule(TINY_LLAMA, **{argument: value})


# ---------------------------------------------------------------------------------------------------------------------
# The module


def quiet_trainer(steps: int, **kwargs) -> L.Trainer:
    options = {"accelerator": "cpu", "max_steps": steps, "logger": False, "enable_checkpointing": False}
    options |= {"enable_progress_bar": False, "enable_model_summary": False, "num_sanity_val_steps": 0}
    return L.Trainer(**options, **kwargs)


def tiny_data(**kwargs) -> ScoredDataModule:
    return ScoredDataModule(TINY_LLAMA, train_path=str(EXAMPLES / "scored_tiny.jsonl"), batch_size=4, **kwargs)


@pytest.fixture(scope="module")
def fitted(tiny_llama_path):
    """An ILQLModule after 4 steps on the packaged scored rows, with its target heads as they started."""
    torch.manual_seed(0)
    module = ILQLModule(TINY_LLAMA, learning_rate=1e-2, alpha=0.5, target_sync_every=1, beta=2.0)
    start = [p.detach().clone() for p in module.target_q_heads.parameters()]
    trainer = quiet_trainer(4, limit_val_batches=1, val_check_interval=4)
    trainer.fit(module, tiny_data(val_fraction=0.2, max_length=64))
    return module.eval(), start, trainer


def test_fit_logs_finite_losses_and_moves_the_target_heads(fitted):
    module, start, trainer = fitted
    metrics = trainer.callback_metrics
    for stage in ("train", "val"):
        for key in ("loss", "loss/q", "loss/v", "loss/cql", "loss/awac", "q", "v"):
            assert torch.isfinite(metrics[f"{stage}/{key}"]), f"{stage}/{key}"
    targets, online = list(module.target_q_heads.parameters()), list(module.heads.q_heads.parameters())
    assert all(not p.requires_grad for p in targets)
    moved = [not torch.equal(t, s) for t, s in zip(targets, start, strict=True)]
    assert all(moved)
    assert any(not torch.equal(t, q) for t, q in zip(targets, online, strict=True))  # α = ½ lags behind


def test_terms_on_the_response_positions_equal_the_full_sequence_math(fitted):
    # The module runs the Q heads on the N response positions only; on the full (B, T) tensors with the response
    # mask, the pure functions must give the same numbers.
    module, _, _ = fitted
    data = tiny_data(max_length=64)
    data.setup("fit")
    batch = next(iter(data.train_dataloader()))
    with torch.no_grad():
        terms = module.terms(batch)
        out = module.model(
            input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], output_hidden_states=True
        )
        hidden = out.hidden_states[-1]
        states, actions = hidden[:, :-1], batch["input_ids"][:, 1:]
        mask = (batch["labels"][:, 1:] != -100).float()
        rewards, done = terminal_rewards(batch["rewards"].float(), mask)
        q_values = module.heads.q_values(states)
        q = q_values.gather(-1, actions.expand(q_values.shape[0], *actions.shape).unsqueeze(-1)).squeeze(-1)
        target_q = module.decoding_heads().action_values(states, actions)
        values = module.heads.values(hidden)
        hp = module.hparams
        close(terms.q, q_loss(q, rewards, values[:, 1:], done, mask, hp.gamma))
        close(terms.v, expectile_loss(target_q, values[:, :-1], mask, hp.tau))
        close(terms.cql, cql_loss(q_values, actions, mask))
        close(terms.awac, lm_loss(out.logits[:, :-1], actions, mask))
    assert mask.sum() < mask.numel(), "the batch has prompt positions the heads skip"


def test_a_checkpoint_restores_the_target_heads(fitted, tmp_path):
    module, _, trainer = fitted
    trainer.save_checkpoint(tmp_path / "ilql.ckpt")
    again = ILQLModule.load_from_checkpoint(tmp_path / "ilql.ckpt")
    assert again.hparams.beta == 2.0 and again.hparams.alpha == 0.5
    pairs = zip(again.target_q_heads.parameters(), module.target_q_heads.parameters(), strict=True)
    assert all(torch.equal(a, b) and not a.requires_grad for a, b in pairs)


def test_targets_sync_every_n_optimizer_steps(tiny_llama_path):
    torch.manual_seed(0)
    module = ILQLModule(TINY_LLAMA, learning_rate=1e-2, alpha=1.0, target_sync_every=2)
    equal = []

    class Watch(L.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            pairs = zip(pl_module.target_q_heads.parameters(), pl_module.heads.q_heads.parameters(), strict=True)
            equal.append(all(torch.equal(t, q) for t, q in pairs))

    quiet_trainer(3, callbacks=[Watch()], limit_val_batches=0).fit(module, tiny_data(max_length=64))
    assert equal == [False, True, False]  # α = 1 copies the Q heads after step 2 only


# ---------------------------------------------------------------------------------------------------------------------
# Decoding


def left_padded(prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    tok = load_tokenizer(TINY_LLAMA, padding_side="left")
    encoded = tok(prompts, return_tensors="pt", padding=True)
    return encoded["input_ids"], encoded["attention_mask"]


def test_export_reloads_heads_that_decode_identically(fitted, tmp_path):
    module, _, _ = fitted
    folder = module.export(tmp_path / "hf")
    heads, beta = load_heads(folder)
    assert beta == 2.0 and heads.sizes == {"hidden_size": 64, "vocab_size": 104, "num_q_heads": 2}
    ids, mask = left_padded(["hi", "say a"])
    sequence = torch.cat([ids, torch.tensor([[14, 15], [16, 17]])], dim=1)
    scores = torch.randn(2, 104)
    from_module = module.make_processor()(ids, mask)(sequence, scores)
    from_folder = make_ilql_processor(folder)(ids, mask)(sequence, scores)
    assert from_module.sub(scores).abs().max() > 1e-3  # the trained heads do perturb
    close(from_folder, from_module)
    with pytest.raises(FileNotFoundError, match="no ILQL heads"):
        load_heads(tmp_path)


class Recorder(ILQLLogitsProcessor):
    """An ILQL processor that keeps what it saw and returned at every step."""

    calls: list

    def __call__(self, input_ids, scores):
        out = super().__call__(input_ids, scores)
        self.calls.append((input_ids.clone(), scores.clone(), out.clone()))
        return out


@pytest.mark.parametrize("backend", ["native", "hf"])
def test_the_cached_processor_equals_a_recompute_inside_the_samplers(fitted, backend):
    module, _, _ = fitted
    tok = load_tokenizer(TINY_LLAMA, padding_side="left")
    generator = PolicyGenerator(PolicyModels(module.model), tok, GenerationOptions(max_new_tokens=6, num_samples=2))
    if backend == "hf":
        generator.sampler = HFSampler(tok, generator.stop_token_ids)
    heads, calls = module.decoding_heads(), []

    def make(prompt_ids, prompt_mask):
        recorder = Recorder(module.model, heads, 2.0, prompt_ids, prompt_mask)
        recorder.calls = calls
        return recorder

    prompts = ["hi", "tell me a story"]  # of different lengths: the first is left-padded
    ids, mask = generator.encode(prompts)
    torch.manual_seed(0)
    samples = generator.samples(prompts, ids, mask, make_processor=make)
    assert len(calls) >= 2 and samples.response_ids.shape[0] == 4
    repeated_ids, repeated_mask = ids.repeat_interleave(2, 0), mask.repeat_interleave(2, 0)
    for input_ids, scores, out in calls:  # a fresh processor runs the whole prefix at once
        close(ILQLLogitsProcessor(module.model, heads, 2.0, repeated_ids, repeated_mask)(input_ids, scores), out)


def test_left_padding_changes_nothing_and_beta_zero_is_the_identity(fitted):
    module, _, _ = fitted
    heads = module.decoding_heads()
    ids, mask = left_padded(["hi", "tell me a story"])
    sequence = torch.cat([ids, torch.tensor([[14, 14, 15], [16, 17, 18]])], dim=1)
    scores = torch.randn(2, 104)
    batched = ILQLLogitsProcessor(module.model, heads, 2.0, ids, mask)(sequence, scores)
    short = mask[0].bool()
    alone = ILQLLogitsProcessor(module.model, heads, 2.0, ids[:1, short], mask[:1, short])
    close(alone(sequence[:1, torch.cat([short, torch.ones(3, dtype=torch.bool)])], scores[:1]), batched[:1])
    identity = ILQLLogitsProcessor(module.model, heads, 0.0, ids, mask)
    assert torch.equal(identity(sequence, scores), scores)
    with pytest.raises(ValueError, match="do not start with the prompts"):
        ILQLLogitsProcessor(module.model, heads, 1.0, ids, mask)(sequence.flip(1), scores)


def test_ilql_decoding_hooks_give_the_log_probs_of_the_distribution_sampled(fitted):
    # One rollout through the algorithm hooks: the training-forward transform must reproduce, token by token, the
    # scores the processor gave the sampler, so log-probs and KL are those of the ILQL policy.
    from lit_rlhf.ilql_decoding import ILQLDecoding

    module, _, _ = fitted
    decoding = ILQLDecoding(module.decoding_heads(), beta=2.0)
    models = PolicyModels(module.model, reference=None)
    generator = PolicyGenerator(models, load_tokenizer(TINY_LLAMA), GenerationOptions(max_new_tokens=6))
    prompt_ids, prompt_mask = generator.encode(["ab", "a longer prompt"])
    torch.manual_seed(0)
    samples = generator.samples(
        ["ab", "x"], prompt_ids, prompt_mask, make_processor=partial_processor(decoding, module)
    )
    sequences, length = samples.sequences, prompt_ids.shape[1]
    transform = decoding.logits_transform(module.model, sequences, samples.attention_mask, length)
    outputs = models.outputs(sequences, samples.attention_mask, length, transform=transform, critic=False)
    plain = models.outputs(sequences, samples.attention_mask, length, critic=False)
    # Recompute the first response token's scores as the processor does, from the prompt alone.
    processor = decoding.logits_processor(module.model, prompt_ids, prompt_mask)
    positions = (prompt_mask.cumsum(-1) - 1).clamp(min=0)
    first = module.model(input_ids=prompt_ids, attention_mask=prompt_mask, position_ids=positions).logits[:, -1]
    expected = processor(prompt_ids, first).log_softmax(-1).gather(-1, sequences[:, length : length + 1]).squeeze(-1)
    close(outputs.logprobs[:, 0], expected, tol=1e-4)
    assert not torch.allclose(outputs.logprobs, plain.logprobs), "beta 2 moves the log-probs"


def partial_processor(decoding, module):
    return lambda prompt_ids, prompt_mask: decoding.logits_processor(module.model, prompt_ids, prompt_mask)
