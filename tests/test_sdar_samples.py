"""Samples, masks, teacher inputs (prefix, left padding, realignment, long skills), GRPO advantages."""

import math

import pytest
import torch

from sdar.samples import (Sample, collate, grpo_advantages, left_pad, shifted_rows, step_samples,
                          teacher_sequence)

PAD = 0


# ------------------------------------------------------------------------------------------ advantages
def test_advantages_hand_worked_group():
    # group 0: rewards 1, 0, 0, 1 -> mean 0.5, unbiased std sqrt(1/3) -> +-0.5 * sqrt(3)
    # group 1: rewards 1, 1, 1 -> std 0 -> all 0 (no signal); group 2: a single episode -> r / (1 + eps)
    adv = grpo_advantages([1, 0, 0, 1, 1, 1, 1, 0.5], [0, 0, 0, 0, 1, 1, 1, 2])
    h = 0.5 * math.sqrt(3)
    torch.testing.assert_close(adv, torch.tensor([h, -h, -h, h, 0, 0, 0, 0.5]), atol=1e-5, rtol=1e-5)


def test_advantages_penalty_rewards_and_eps():
    r = [0.9, 1.0, -0.1, 0.0]       # an invalid action costs 0.1
    mean = sum(r) / 4
    std = math.sqrt(sum((x - mean) ** 2 for x in r) / 3)
    adv = grpo_advantages(r, [3] * 4)
    torch.testing.assert_close(adv, torch.tensor([(x - mean) / (std + 1e-6) for x in r]))
    torch.testing.assert_close(grpo_advantages(r, [3] * 4, norm_by_std=False),
                               torch.tensor([x - mean for x in r]))


def test_advantages_groups_need_not_be_contiguous():
    a = grpo_advantages([1, 5, 0, 7], [0, 1, 0, 1])
    b = grpo_advantages([1, 0, 5, 7], [0, 0, 1, 1])
    torch.testing.assert_close(a[[0, 2, 1, 3]], b)


def test_advantages_shape_error():
    with pytest.raises(ValueError, match="scores, groups and episodes"):
        grpo_advantages([1.0, 0.0], [0])
    with pytest.raises(ValueError, match="scores, groups and episodes"):
        grpo_advantages([1.0, 0.0], [0, 0], [0])


def one_group_of_step_rows():
    """2 successful episodes of 4 steps and 6 failed episodes of 6 steps: one row per step."""
    scores, episodes = [], []
    for e in range(8):
        n, r = (4, 1.0) if e < 2 else (6, 0.0)
        scores += [r] * n
        episodes += [e] * n
    return scores, [0] * len(scores), episodes


def test_advantages_cross_steps_count_every_row():
    # verl-agent's default: 8 success rows and 36 failure rows enter the mean / unbiased std
    scores, groups, episodes = one_group_of_step_rows()
    adv = grpo_advantages(scores, groups, episodes, cross_steps=True)
    mean = 8 / 44
    std = math.sqrt((8 * (1 - mean) ** 2 + 36 * mean ** 2) / 43)
    assert adv[0].item() == pytest.approx((1 - mean) / (std + 1e-6), rel=1e-5)
    assert adv[-1].item() == pytest.approx(-mean / (std + 1e-6), rel=1e-5)
    assert adv[0].item() == pytest.approx(2.10, abs=0.005) and adv[-1].item() == pytest.approx(-0.47, abs=0.005)


def test_advantages_one_score_per_episode():
    # cross_steps=False: the 8 episodes count once each (2 of 8 succeed): mean 0.25, std sqrt(0.25*0.75*8/7)
    scores, groups, episodes = one_group_of_step_rows()
    adv = grpo_advantages(scores, groups, episodes, cross_steps=False)
    std = math.sqrt(0.25 * 0.75 * 8 / 7)
    assert adv[0].item() == pytest.approx(0.75 / (std + 1e-6), rel=1e-5)
    assert adv[-1].item() == pytest.approx(-0.25 / (std + 1e-6), rel=1e-5)
    assert adv[0].item() == pytest.approx(1.62, abs=0.005) and adv[-1].item() == pytest.approx(-0.54, abs=0.005)
    # every row is normalised with its own score: an invalid step's penalised row stands apart
    scores[1] -= 0.1
    adv2 = grpo_advantages(scores, groups, episodes, cross_steps=False)
    assert adv2[0].item() == pytest.approx(adv[0].item(), rel=1e-6)     # the first row stood for the episode
    assert adv2[1].item() == pytest.approx((0.65) / (std + 1e-6), rel=1e-5)


def test_batch_records_each_tokens_row_and_step():
    eps = [{"steps": [([5, 6], [7, 1]), ([5, 8], [9, 1])], "skill_ids": [3]},
           {"steps": [([5], [7, 1])], "skill_ids": [4]}]
    samples = step_samples(eps, "released")
    assert [s.episode for s in samples] == [0, 0, 1]
    b = collate(samples, PAD)
    assert b.token_row.tolist() == [0, 0, 1, 1, 2, 2]
    assert b.token_step.tolist() == [0, 0, 1, 1, 0, 0]
    (c,) = step_samples(eps[:1], "concat")
    bc = collate([c], PAD)
    assert bc.labels.tolist() == [7, 1, 9, 1] and bc.token_step.tolist() == [0, 0, 1, 1]


# ------------------------------------------------------------------------------------------ layouts
EPISODE = {"steps": [([10, 11, 12], [20, 1]), ([13, 14], [21, 1]), ([15], [22, 23, 24])], "skill_ids": [30, 31]}


def test_released_layout_one_sample_per_step():
    s = step_samples([EPISODE], "released")
    assert len(s) == 3
    assert s[1].ids == [13, 14, 21, 1] and s[1].loss_mask == [0, 0, 1, 1]
    assert s[2].ids == [15, 22, 23, 24] and s[2].loss_mask == [0, 1, 1, 1]


def test_concat_layout_masks_observations():
    (s,) = step_samples([EPISODE], "concat")
    assert s.ids == [10, 11, 12, 20, 1, 13, 14, 21, 1, 15, 22, 23, 24]
    assert s.loss_mask == [0, 0, 0, 1, 1, 0, 0, 1, 1, 0, 1, 1, 1]
    b = collate([s], PAD)
    # the loss tokens are exactly the action tokens (the first token never has a prediction)
    assert b.labels.tolist() == [20, 1, 21, 1, 22, 23, 24]
    obs = {10, 11, 12, 13, 14, 15}
    assert not obs & set(b.labels.tolist())


def test_layout_error():
    with pytest.raises(ValueError, match="layout"):
        step_samples([EPISODE], "interleaved")


# ------------------------------------------------------------------------------------------ teacher
def test_teacher_sequence_prefix_then_student_tokens():
    s = Sample([10, 11, 20, 1], [0, 0, 1, 1], 0, [30, 31, 32])
    ids, mask = teacher_sequence(s)
    assert ids == [30, 31, 32, 10, 11, 20, 1]
    assert mask == [0, 0, 0, 0, 0, 1, 1]


def test_left_pad_positions_start_at_first_token():
    ids, attn, pos, _ = left_pad([[5, 6, 7], [8]], PAD)
    assert ids.tolist() == [[5, 6, 7], [0, 0, 8]]
    assert attn.tolist() == [[1, 1, 1], [0, 0, 1]]
    assert pos.tolist() == [[0, 1, 2], [0, 0, 0]]


def test_teacher_realigned_to_student_tokens():
    # rows of different prompt / skill / response lengths
    samples = [Sample([10, 11, 12, 20, 1], [0, 0, 0, 1, 1], 0, [30]),
               Sample([13, 21, 22, 1], [0, 1, 1, 1], 1, [31, 32, 33, 34, 35]),
               Sample([14, 15, 23], [0, 0, 1], 2, [])]
    b = collate(samples, PAD)
    t_ids, t_attn, t_pos = b.teacher
    S, T = b.input_ids.shape[1], t_ids.shape[1]
    assert (S, T) == (5, 9)
    # every row ends in the last column in both batches, prefix first in the teacher row
    assert t_ids[1].tolist() == [31, 32, 33, 34, 35, 13, 21, 22, 1]
    assert t_ids[0].tolist() == [0, 0, 0, 30, 10, 11, 12, 20, 1]
    assert t_pos[0].tolist() == [0, 0, 0, 0, 1, 2, 3, 4, 5]
    assert t_attn[2].tolist() == [0] * 6 + [1] * 3
    # a "model" whose output at position j is the next input token: the shifted rows give the labels
    nxt = lambda ids: torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -1)], 1)  # noqa: E731
    assert shifted_rows(nxt(b.input_ids), S)[b.select].tolist() == b.labels.tolist()
    assert shifted_rows(nxt(t_ids), S)[b.select].tolist() == b.labels.tolist()
    assert b.labels.tolist() == [20, 1, 21, 22, 1, 23]


def test_long_skill_is_kept_and_prompt_cut_from_the_left():
    skill = list(range(100, 140))      # 40-token skill
    s = Sample(list(range(10, 30)) + [20, 1], [0] * 20 + [1, 1], 0, skill)
    ids, mask = teacher_sequence(s, max_teacher_len=50)
    assert ids[:40] == skill                       # the whole skill survives
    assert ids[-2:] == [20, 1] and mask[-2:] == [1, 1]
    assert len(ids) == 50 and ids[40:48] == list(range(22, 30))
    ids2, _ = teacher_sequence(s, max_teacher_len=30, max_skill_tokens=10)
    assert ids2[:10] == skill[:10] and ids2[-2:] == [20, 1] and len(ids2) == 30
    with pytest.raises(ValueError, match="max_teacher_len"):
        teacher_sequence(s, max_teacher_len=41)
    b = collate([s], PAD, max_teacher_len=50)   # still aligned after truncation
    assert b.teacher[0].shape[1] == 50 and b.labels.tolist() == [20, 1]


def test_sample_mask_length_checked():
    with pytest.raises(ValueError, match="loss_mask"):
        Sample([1, 2], [0], 0)
