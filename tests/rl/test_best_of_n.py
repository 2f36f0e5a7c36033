"""Best-of-n (``lit_rlhf.rl.best_of_n``): the analytic KL and the choice by hand, the kept completion is the reward's
argmax over the candidates, n = 1 is plain sampling, a seed fixes the result, and ``lit-rlhf best-of-n`` writes its
file end to end."""

import json
import math

import pytest
import torch

from lit_rlhf.cli import main
from lit_rlhf.data import DataFormatError
from lit_rlhf.rl import GenerationOptions, PolicyGenerator
from lit_rlhf.rl.best_of_n import best_indices, best_of_n, best_of_n_kl
from tests.rl.support import PROMPTS


def vowels(prompts: list[str], completions: list[str]) -> torch.Tensor:
    """A rule-based reward the test can recompute: the number of vowels in each completion."""
    return torch.tensor([float(sum(c in "aeiou" for c in text)) for text in completions])


@pytest.fixture(scope="module")
def generator() -> PolicyGenerator:
    return PolicyGenerator.load("tiny-llama", GenerationOptions(max_new_tokens=12), vowels, reference=False)


def test_best_of_n_kl_by_hand():
    assert best_of_n_kl(1) == 0.0  # log 1 - 0/1: one sample is the policy itself
    assert best_of_n_kl(2) == pytest.approx(0.193147, abs=1e-6)  # log 2 - 1/2 = 0.693147 - 0.5
    assert best_of_n_kl(4) == pytest.approx(0.636294, abs=1e-6)  # log 4 - 3/4 = 1.386294 - 0.75
    assert best_of_n_kl(16) == pytest.approx(1.835089, abs=1e-6)  # log 16 - 15/16 = 2.772589 - 0.9375
    with pytest.raises(ValueError, match="n >= 1"):
        best_of_n_kl(0)


def test_best_indices_pick_the_highest_score_of_each_group_and_the_first_on_ties():
    scores = torch.tensor([0.1, 0.5, 0.5, 0.2, 3.0, 1.0, 2.0, 0.0])
    assert best_indices(scores, 4).tolist() == [1, 0]  # 0.5 twice: the first; 3.0 leads the second group
    assert best_indices(scores, 1).tolist() == [0] * 8  # groups of one: each candidate is its own best
    with pytest.raises(ValueError, match="groups of n = 3"):
        best_indices(scores, 3)


def test_the_kept_completion_is_the_rewards_argmax_over_its_candidates(generator):
    results = best_of_n(generator, PROMPTS, n=6, batch_size=3, seed=0)
    assert [r.prompt for r in results] == PROMPTS
    for result in results:
        assert result.n == 6 and result.kl == pytest.approx(best_of_n_kl(6))
        recomputed = vowels([result.prompt] * 6, result.candidates).tolist()
        assert result.scores == recomputed
        assert (
            result.score == max(recomputed)
            and result.completion == result.candidates[recomputed.index(max(recomputed))]
        )
    # With 6 random candidates the best is better than the average for some prompt: the choice is not a no-op.
    assert any(r.score > sum(r.scores) / r.n for r in results)


def test_n_1_is_plain_sampling(generator):
    kept = [r.completion for r in best_of_n(generator, PROMPTS, n=1, batch_size=4, seed=3)]
    torch.manual_seed(3)
    assert kept == generator.generate(PROMPTS, batch_size=4)


def test_a_seed_fixes_the_result_and_leaves_the_callers_random_stream_alone(generator):
    state = torch.get_rng_state()
    first, again = (best_of_n(generator, PROMPTS[:4], n=3, seed=7) for _ in range(2))
    assert torch.equal(torch.get_rng_state(), state)
    assert [r.candidates for r in first] == [r.candidates for r in again]
    assert [r.candidates for r in best_of_n(generator, PROMPTS[:4], n=3, seed=8)] != [r.candidates for r in first]


def test_a_reward_is_required():
    generator = PolicyGenerator.load("tiny-llama", GenerationOptions(max_new_tokens=4), reference=False)
    with pytest.raises(ValueError, match="needs a reward"):
        best_of_n(generator, ["hi"], n=2)


def test_the_command_writes_one_row_per_prompt_with_its_candidates(tmp_path, capsys):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "hello"}, {"messages": [{"role": "user", "content": "say a"}]}, {"prompt": "list fruits"}]
    prompts.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output = tmp_path / "out" / "bon.jsonl"
    args = ["best-of-n", "--policy", "tiny-llama", "--reward", "lit_rlhf.rewards.CharacterShareReward"]
    args += ["--reward.target", "aeiou", "--prompts", str(prompts), "--n", "4", "--output", str(output)]
    args += ["--generation.max_new_tokens", "8", "--progress_bar", "false"]
    main(args)
    written = [json.loads(line) for line in output.read_text().splitlines()]
    assert [row["prompt"] for row in written] == ["hello", "say a", "list fruits"]
    for row in written:
        assert set(row) == {"prompt", "completion", "score", "n", "kl", "candidates"}
        assert row["n"] == len(row["candidates"]) == 4 and math.isclose(row["kl"], math.log(4) - 3 / 4)
        best = max(row["candidates"], key=lambda c: c["score"])
        assert (row["completion"], row["score"]) == (best["completion"], best["score"])
    assert "3 prompts × 4 candidates" in capsys.readouterr().out

    with pytest.raises(SystemExit) as exit_info:
        main([*args, "--print_config"])
    assert exit_info.value.code == 0
    assert "class_path: lit_rlhf.rewards.CharacterShareReward" in capsys.readouterr().out

    prompts.write_text('{"prompt": "fine"}\n{"text": "no prompt field"}\n')
    with pytest.raises(DataFormatError, match=r"prompts.jsonl:2: field 'prompt'"):
        main(args)
