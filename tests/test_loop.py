"""The loop's pure helpers: scoring, GRPO batch building and the per-step row."""
import pytest
import torch

from core.config import GRPOConfig
from launch.batch import Rollout, build_batch, score, step_row
from launch.data import Example
from rewards import Scorer
from core.types import Sample

GOOD, WRONG, BARE = "so 3 + 4 = 7\n<answer>7</answer>", "so 3 + 4 = 8\n<answer>8</answer>", "7"


def gold(*answers):
    return [Example(i, "q", a) for i, a in enumerate(answers)]


def group(texts, finish="stop", version=2):
    return [Sample([1, 2], [5] * (i + 1), [-0.5] * (i + 1), finish, version, t) for i, t in enumerate(texts)]


def test_score_build_batch_and_row():
    groups = [group([GOOD, WRONG, BARE, GOOD]), group([WRONG, WRONG, WRONG, WRONG]),
              [Sample([9] * 9, [], [], "dropped", 2) for _ in range(4)]]
    reward = Scorer({"accuracy": 1.0, "format": 0.2})
    rewards, details = score(groups, gold("7", "7", "7"), reward)
    assert rewards.tolist() == [[1.2, 0.2, 0.0, 1.2], [0.2] * 4, [0.0] * 4]
    assert len(details["accuracy"]) == 8  # the dropped prompt is not scored
    assert details["format_rate"] == [1, 1, 0, 1, 1, 1, 1, 1]

    batch, filtered = build_batch(groups, rewards, GRPOConfig(filter_groups=True))
    assert filtered == 2 and len(batch) == 4  # all-equal group and dropped prompt filtered
    mean, std = 0.65, torch.tensor([1.2, 0.2, 0.0, 1.2]).std().item()
    assert [s.advantage for s in batch] == pytest.approx([(r - mean) / (std + 1e-6) for r in (1.2, 0.2, 0.0, 1.2)])
    assert batch[2].completion_ids == [5, 5, 5] and batch[0].weight_version == 2
    unfiltered, n_filtered = build_batch(groups, rewards, GRPOConfig(filter_groups=False))
    assert n_filtered == 1 and len(unfiltered) == 8 and all(s.advantage == 0 for s in unfiltered[4:])

    ro = Rollout([0, 1, 2], groups, rewards, details, batch, filtered, {}, {"generate": 2.0})
    row = step_row(ro, None, 2)
    assert row["reward"] == pytest.approx((2.6 + 0.8) / 8)  # the dropped prompt does not pull the mean down
    assert row["accuracy"] == pytest.approx(2 / 8) and row["dropped_prompts"] == 1
    assert row["completion_len"] == pytest.approx((1 + 2 + 3 + 4) * 2 / 8)
    assert row["gen_tokens_per_s"] == pytest.approx(20 / 2.0)


def test_overlong_mask_and_penalty():
    long_group = [Sample([1], [5] * n, [-0.5] * n, finish, 2, text) for n, finish, text in
                  ((8, "length", GOOD), (3, "stop", GOOD), (5, "stop", WRONG), (7, "length", BARE))]
    reward = Scorer({"accuracy": 1.0})
    plain, _ = score([long_group], gold("7"), reward)
    assert plain.tolist() == [[1.0, 1.0, 0.0, 0.0]]
    # max_tokens 8, buffer 4: lengths 8, 3, 5, 7 → penalties −1, 0, −0.25, −0.75
    shaped, details = score([long_group], gold("7"), reward, GRPOConfig(overlong="penalty", overlong_buffer=4), 8)
    assert shaped.tolist() == [[0.0, 1.0, -0.25, -0.75]] and details["overlong_penalty"] == [-1.0, 0.0, -0.25, -0.75]
    kept, _ = build_batch([long_group], plain, GRPOConfig(overlong="off"))
    masked, _ = build_batch([long_group], plain, GRPOConfig(overlong="mask"))
    assert len(kept) == 4 and [len(s.completion_ids) for s in masked] == [3, 5]  # the cut ones leave the loss...
    assert [s.advantage for s in masked] == [kept[1].advantage, kept[2].advantage]  # ...but count in the group
