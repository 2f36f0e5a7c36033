"""Stage 1: sample K completions per training prompt from the policy and have the simulated annotator label pairs,
written as pairs or as one ranking per prompt."""

from __future__ import annotations

import itertools
import random
from statistics import fmean
from typing import Any

import torch
from tqdm.auto import tqdm

from lit_rlhf.data import PreferenceExample, RankingExample, load_prompts, write_preferences
from lit_rlhf.pipeline.common import RunPaths, annotator_for, generator, sampling_precision, write_jsonl
from lit_rlhf.pipeline.config import PipelineConfig


def all_pairs(k: int) -> list[tuple[int, int]]:
    """Index pairs (i, j), i < j, of k completions: the k(k−1)/2 comparisons one prompt yields."""
    return list(itertools.combinations(range(k), 2))


def split_prompts(prompts: list[str], val_fraction: float, seed: int) -> set[str]:
    """The prompts held out for validation: a seeded ``val_fraction`` of them, at least one when the fraction is
    positive and there are two or more prompts, never all of them."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"collect.val_fraction must be in [0, 1), got {val_fraction}.")
    unique = sorted(set(prompts))
    count = round(val_fraction * len(unique))
    if val_fraction > 0 and len(unique) >= 2:
        count = min(max(count, 1), len(unique) - 1)
    return set(random.Random(seed).sample(unique, count))


def rank_by_wins(labels: list[dict[str, Any]]) -> list[RankingExample]:
    """One ranking per prompt from its labelled pairs (``prompt``/``chosen``/``rejected`` records): each distinct
    completion is scored by the share of its pairs it won (a wins count, divided by the pairs it took part in, which
    differ only where identical samples or dropped ties left some out). Prompts whose completions all won the same
    share, a cycle of labels among them, carry no order and give no ranking."""
    tallies: dict[str, dict[str, list[int]]] = {}
    for label in labels:
        group = tallies.setdefault(label["prompt"], {})
        for completion, won in ((label["chosen"], 1), (label["rejected"], 0)):
            record = group.setdefault(completion, [0, 0])
            record[0] += won
            record[1] += 1
    rankings = []
    for prompt, group in tallies.items():
        scores = tuple(wins / pairs for wins, pairs in group.values())
        if len(set(scores)) > 1:
            rankings.append(RankingExample(prompt, tuple(group), scores))
    return rankings


def run_collect(config: PipelineConfig, paths: RunPaths) -> dict[str, Any]:
    """Write ``collect/train.jsonl`` and ``collect/val.jsonl`` (preference pairs, or rankings with
    ``collect.format: rankings``) and ``collect/annotations.jsonl`` (the labelled pairs)."""
    cc = config.collect
    k = cc.generation.num_samples
    if k < 2:
        raise ValueError(f"collect.generation.num_samples is {k}: at least 2 completions per prompt make a pair.")
    prompts = load_prompts(config.train_prompts, "train", cc.num_prompts)
    annotator = annotator_for(config)
    policy = generator(config, cc.generation)
    torch.manual_seed(config.seed)

    annotations: list[dict[str, Any]] = []
    identical = 0
    with tqdm(
        total=len(prompts), desc="collect: sample and label", unit="prompt", disable=not config.progress_bar
    ) as bar:
        for start in range(0, len(prompts), cc.batch_size):
            chunk = prompts[start : start + cc.batch_size]
            with sampling_precision(config, policy):
                completions = policy.generate(
                    chunk,
                    chat_template=config.chat_template,
                    system_prompt=config.system_prompt,
                    max_prompt_length=config.max_prompt_length,
                    batch_size=cc.batch_size,
                )
            pair_prompts, first, second = [], [], []
            for row, prompt in enumerate(chunk):
                group = completions[row * k : (row + 1) * k]
                for i, j in all_pairs(k):
                    if group[i] == group[j]:  # nothing to prefer; read_preferences would drop it anyway
                        identical += 1
                        continue
                    pair_prompts.append(prompt)
                    first.append(group[i])
                    second.append(group[j])
            for preference in annotator.compare(pair_prompts, first, second):
                annotations.append(_record(preference))
            bar.update(len(chunk))

    val_prompts = split_prompts(prompts, cc.val_fraction, config.seed)
    ties = sum(bool(a.get("tie")) for a in annotations)
    kept = [a for a in annotations if not (cc.drop_ties and a.get("tie"))]
    for a in annotations:
        a["split"] = "val" if a["prompt"] in val_prompts else "train"
    if cc.format == "rankings":
        train: list[Any] = rank_by_wins([a for a in kept if a["split"] == "train"])
        val: list[Any] = rank_by_wins([a for a in kept if a["split"] == "val"])
    else:
        train = [_example(a) for a in kept if a["split"] == "train"]
        val = [_example(a) for a in kept if a["split"] == "val"]
    if not train:
        raise RuntimeError(
            f"collect produced no training pairs from {len(prompts)} prompts ({len(annotations)} labelled, {ties} "
            f"ties, {identical} identical): raise collect.num_prompts or collect.generation.num_samples, or set "
            "collect.drop_ties: false."
        )
    write_preferences(train, paths.train_pairs)
    write_preferences(val, paths.val_pairs)
    write_jsonl(paths.annotations, annotations)

    judged = [a for a in annotations if "score_chosen" in a]
    scored = [a for a in judged if not a.get("tie")]
    return {
        "prompts": len(prompts),
        "samples_per_prompt": k,
        "completions": len(prompts) * k,
        "pairs_labelled": len(annotations),
        "identical_pairs": identical,
        "ties": ties,
        "ties_dropped": cc.drop_ties,
        "format": cc.format,
        # Comparisons the reward model trains on: one per pair row, every differently scored two of a ranking.
        "train_pairs": comparisons_in(train),
        "val_pairs": comparisons_in(val),
        **({"train_rankings": len(train), "val_rankings": len(val)} if cc.format == "rankings" else {}),
        "val_prompts": len(val_prompts),
        # How often the sampled label follows the judge's own ordering: 1 for a noiseless annotator.
        "label_agreement_with_judge": (
            fmean(a["score_chosen"] > a["score_rejected"] for a in scored) if scored else None
        ),
        # Every completion takes part in about K − 1 pairs, so this is close to the mean over completions.
        "mean_judge_score": fmean(s for a in judged for s in (a["score_chosen"], a["score_rejected"]))
        if judged
        else None,
        "annotator": type(annotator).__name__,
    }


def comparisons_in(examples: list[PreferenceExample] | list[RankingExample]) -> int:
    """How many comparisons the examples hold: 1 per pair, ``len(example.pairs)`` per ranking."""
    return sum(len(e.pairs) if isinstance(e, RankingExample) else 1 for e in examples)


def _record(preference: Any) -> dict[str, Any]:
    """One labelled pair as a JSON record; any annotator result with ``prompt``/``chosen``/``rejected`` works."""
    if hasattr(preference, "to_dict"):
        return dict(preference.to_dict())
    return {"prompt": preference.prompt, "chosen": preference.chosen, "rejected": preference.rejected}


def _example(annotation: dict[str, Any]) -> PreferenceExample:
    # No margin: a human label says which is better, not by how much; the judge's gap stays in annotations.jsonl.
    return PreferenceExample(annotation["prompt"], annotation["chosen"], annotation["rejected"])
