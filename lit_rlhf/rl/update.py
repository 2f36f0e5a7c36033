"""The update half of an RL iteration: ``epochs × minibatches`` optimizer steps of the algorithm's loss on one
rollout, with gradient accumulation, clipping and KL early stopping."""

from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext

import lightning as L
import torch
from torch import Tensor, nn

from lit_rlhf.finetuning import check_finite_loss
from lit_rlhf.rl.experience import Experience, PolicyOutputs
from lit_rlhf.rl.losses import approx_kl
from lit_rlhf.scale import clip_grad_norm, float_mean_over_ranks, skip_gradient_sync

FINITE_ADVICE = "lower the learning rate, clip rewards (reward_clip) or check the reward's scale."


def ptx_loss(policy: nn.Module, batch: dict[str, Tensor]) -> Tensor:
    """The language-modelling loss of PPO-ptx: mean negative log-likelihood of the labelled tokens.

    Shape: batch ``input_ids``, ``attention_mask``, ``labels`` (b, L), labels -100 where no loss -> ().
    """
    return policy(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"]).loss


def run_update(
    module: L.LightningModule,
    experience: Experience,
    first: PolicyOutputs | None = None,
    ptx: dict[str, Tensor] | None = None,
) -> dict[str, Tensor]:
    """The optimizer steps of ``module.algorithm.schedule`` on ``algorithm.loss``; returns the mean metrics.

    ``ptx``: the iteration's PPO-ptx rows (``input_ids``, ``attention_mask``, ``labels``, (R, L)), split into one share
    per micro-batch of a pass (the same shares again in later epochs); each micro-batch's loss gains
    ``module.ptx_coef`` × ``ptx_loss`` of its share (InstructGPT mixes a pretraining minibatch into every step).

    ``module``: the ``RLHFModule`` (its algorithm, optimizer, ``policy_outputs``, ``max_grad_norm``,
    ``gradient_accumulation_steps`` and ``iteration``; typed loosely so this file does not import the module's).

    ``first``: the policy's outputs on all of ``experience``'s rows at the current weights, with their graph; the
    first micro-batch uses them (its rows selected) instead of a forward of its own.
    """
    algorithm, schedule, opt = module.algorithm, module.algorithm.schedule, module.optimizers()
    accumulation = module.gradient_accumulation_steps
    rows = experience.batch_size
    if schedule.num_minibatches * accumulation > rows:
        raise ValueError(
            f"{type(algorithm).__name__}.num_minibatches ({schedule.num_minibatches}) × "
            f"gradient_accumulation_steps ({accumulation}) exceeds the {rows} rollout rows; "
            "lower them or raise data.batch_size / generation.num_samples."
        )
    ptx_shares: list[dict[str, Tensor]] = []
    if ptx is not None:
        rows_of = torch.arange(len(ptx["input_ids"])).chunk(schedule.num_minibatches * accumulation)
        ptx_shares = [{key: value[index] for key, value in ptx.items()} for index in rows_of]
    totals: dict[str, float] = defaultdict(float)
    steps, early_stop = 0, False
    for _ in range(schedule.epochs):
        order = torch.randperm(rows, device=module.device)
        for minibatch in order.chunk(schedule.num_minibatches):
            step_metrics: dict[str, float] = defaultdict(float)
            micros = minibatch.chunk(accumulation)
            for i, micro in enumerate(micros):
                part = experience.select(micro)
                # Under DDP every manual_backward all-reduces: accumulate locally until the last micro-batch.
                last = i == len(micros) - 1
                with nullcontext() if last or module._trainer is None else skip_gradient_sync(module):
                    if first is not None:
                        outputs, first = first.select(micro), None
                    else:
                        outputs = module.policy_outputs(part.sequences, part.attention_mask, part.prompt_ids.shape[1])
                    loss, metrics = algorithm.loss(part, outputs)
                    if ptx_shares:
                        share = ptx_shares[(steps * len(micros) + i) % len(ptx_shares)]
                        language = ptx_loss(module.policy, share)
                        metrics["ptx/loss"] = language.detach()
                        loss = loss + module.ptx_coef * language
                    check_finite_loss(
                        loss, f"{type(algorithm).__name__} at iteration {module.iteration}", FINITE_ADVICE
                    )
                    weight = len(micro) / len(minibatch)
                    module.manual_backward(loss * weight)
                metrics["policy/approx_kl"] = approx_kl(outputs.logprobs.detach(), part.logprobs, part.response_mask)
                for key, value in metrics.items():
                    step_metrics[key] += weight * float(value)
            if module.max_grad_norm is not None:
                clip_grad_norm(module, opt, module.max_grad_norm)
            opt.step()
            opt.zero_grad(set_to_none=True)
            steps += 1
            for key, value in step_metrics.items():
                totals[key] += value
            # Every rank must take the same number of steps (each backward is a collective): decide on the mean.
            approx = float_mean_over_ranks(module, step_metrics["policy/approx_kl"])
            if schedule.target_kl is not None and approx > schedule.target_kl:
                early_stop = True
                break
        if early_stop:
            break
    metrics = {key: torch.tensor(value / steps) for key, value in totals.items()}
    metrics["policy/optimizer_steps"] = torch.tensor(float(steps))
    metrics["policy/early_stop"] = torch.tensor(float(early_stop))
    return metrics
