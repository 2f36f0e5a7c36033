"""Bradley–Terry loss and completion NLL against numbers worked out by hand."""

import math

import torch

from lit_rlhf.reward import bradley_terry_loss
from lit_rlhf.sft import completion_nll


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


def test_completion_nll_counts_only_labelled_tokens():
    # Vocabulary of 2; uniform logits give log 2 per predicted token.
    logits = torch.zeros(1, 4, 2)
    # Position 0 is the prompt (-100), tokens 1..3 are the completion; position t predicts label t+1,
    # so labels[1:] = [1, 0, -100] -> two counted tokens, each log 2.
    labels = torch.tensor([[-100, 1, 0, -100]])
    nll, count = completion_nll(logits, labels)
    assert count.tolist() == [2]
    assert math.isclose(nll.item(), 2 * math.log(2), rel_tol=1e-6)


def test_completion_nll_confident_correct_prediction_is_cheap():
    logits = torch.tensor([[[0.0, 10.0], [0.0, 0.0]]])
    labels = torch.tensor([[-100, 1]])
    nll, count = completion_nll(logits, labels)
    # -log softmax([0, 10])[1] = log(1 + e^-10) = 4.53989e-05
    assert count.item() == 1
    assert math.isclose(nll.item(), math.log1p(math.exp(-10)), abs_tol=1e-6)


def test_default_adamw_is_fused_and_takes_the_same_step_as_torch_loop():
    from lit_rlhf.optim import adamw

    torch.manual_seed(0)
    weights = [torch.randn(5, 3), torch.randn(7)]
    fused_params = [torch.nn.Parameter(w.clone()) for w in weights]
    loop_params = [torch.nn.Parameter(w.clone()) for w in weights]
    fused = adamw([{"params": fused_params[:1]}, {"params": fused_params[1:], "lr": 0.1}], 0.01, 0.05)
    loop = torch.optim.AdamW(
        [{"params": loop_params[:1]}, {"params": loop_params[1:], "lr": 0.1}], lr=0.01, weight_decay=0.05, foreach=False
    )
    assert fused.defaults["fused"] and not loop.defaults["fused"]
    assert [g["lr"] for g in fused.param_groups] == [0.01, 0.1]
    for _ in range(3):
        grads = [torch.randn_like(w) for w in weights]
        for params, opt in ((fused_params, fused), (loop_params, loop)):
            for p, g in zip(params, grads, strict=True):
                p.grad = g.clone()
            opt.step()
    for a, b, w in zip(fused_params, loop_params, weights, strict=True):
        assert not torch.equal(a, w)  # it stepped
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_default_adamw_falls_back_where_there_is_no_fused_kernel():
    from lit_rlhf.optim import adamw

    assert adamw([torch.nn.Parameter(torch.zeros(2, dtype=torch.float64))], 0.1, 0.0).defaults["fused"]
    # torch has no fused AdamW for the meta device: the helper leaves the choice to torch instead of failing.
    on_meta = adamw([torch.nn.Parameter(torch.empty(2, device="meta"))], 0.1, 0.0)
    assert not on_meta.defaults["fused"]
