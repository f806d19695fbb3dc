"""Training samples, masks, teacher inputs and GRPO advantages.

Two layouts (``layout``):

- ``"released"`` (the official SDAR / verl-agent layout): every environment step is one sample. Its prompt
  is the task, the last ``history`` turns and the current observation; its response is the action tokens
  (with the end-of-sequence token when one was sampled). Loss mask: the response tokens.
- ``"concat"``: the whole trajectory is one sequence, task / observation segments interleaved with the
  action tokens; observation tokens are masked out of the loss, every action token is in it.

Teacher inputs: the privileged prefix ``SKILL_TEMPLATE.format(skill=...)`` tokenised on its own, then
exactly the student's token ids (prompt and response). Token ids are concatenated, never re-tokenised, so
the teacher scores the student's own sampled tokens. Every batch is *left*-padded, so the student tokens of
a row end in the last column of both the student and the teacher batch: the teacher's row for a student
position is that position shifted by ``T - S`` (teacher width minus student width), the same shift for
every row (``shifted_rows``). If ``max_teacher_len`` is set, the student's prompt is cut from the left and
the skill is kept (the released code left-truncates the joined text, which drops the skill first).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

LAYOUTS = ("released", "concat")
SKILL_TEMPLATE = "privileged {skill} end"


# ----------------------------------------------------------------------------------------- samples
@dataclass
class Sample:
    ids: list                 # student token ids: prompt and response(s)
    loss_mask: list           # 1 on response (action) tokens, 0 on prompt / observation tokens
    episode: int              # index of the episode in its rollout batch
    skill_ids: list = field(default_factory=list)   # privileged prefix (teacher only)
    steps: list = field(default_factory=list)       # environment step (turn index) of every id; -1 off-loss
    score: float = 0.0        # the row's GRPO score (set by the trainer: reward, minus penalties)
    meta: dict = field(default_factory=dict)        # the trainer's per-sample notes (diagnostics)

    def __post_init__(self):
        if len(self.ids) != len(self.loss_mask):
            raise ValueError(f"loss_mask has {len(self.loss_mask)} entries for {len(self.ids)} ids")
        if not self.steps:
            self.steps = [-1 if m == 0 else 0 for m in self.loss_mask]
        if len(self.steps) != len(self.ids):
            raise ValueError(f"steps has {len(self.steps)} entries for {len(self.ids)} ids")


def step_samples(episodes, layout: str) -> list:
    """Samples from rolled-out episodes. Each episode: dict(steps=[(prompt_ids, response_ids)], skill_ids).

    In the released layout ``prompt_ids`` is the whole step prompt; in the concatenated layout it is the
    observation segment and the sample is all segments and responses joined. ``Sample.steps`` records
    which environment step each response token belongs to (for per-step diagnostics).
    """
    if layout not in LAYOUTS:
        raise ValueError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    out = []
    for e, ep in enumerate(episodes):
        if layout == "released":
            for t, (p, r) in enumerate(ep["steps"]):
                out.append(Sample(list(p) + list(r), [0] * len(p) + [1] * len(r), e, list(ep["skill_ids"]),
                                  [-1] * len(p) + [t] * len(r)))
        else:
            ids, mask, steps = [], [], []
            for t, (p, r) in enumerate(ep["steps"]):
                ids += list(p) + list(r)
                mask += [0] * len(p) + [1] * len(r)
                steps += [-1] * len(p) + [t] * len(r)
            out.append(Sample(ids, mask, e, list(ep["skill_ids"]), steps))
    return out


def teacher_sequence(sample: Sample, *, max_teacher_len: int | None = None,
                     max_skill_tokens: int | None = None):
    """(ids, loss_mask) of the teacher input: privileged prefix, then the student's ids unchanged."""
    skill = sample.skill_ids if max_skill_tokens is None else sample.skill_ids[:max_skill_tokens]
    ids, mask = list(sample.ids), list(sample.loss_mask)
    if max_teacher_len is not None and len(skill) + len(ids) > max_teacher_len:
        keep = max_teacher_len - len(skill)
        first_resp = mask.index(1) if 1 in mask else len(mask)
        if keep < len(ids) - first_resp + 1:
            raise ValueError(
                f"max_teacher_len={max_teacher_len} cannot hold the skill ({len(skill)} tokens) and the "
                f"{len(ids) - first_resp} response tokens; raise it or set max_skill_tokens")
        ids, mask = ids[-keep:], mask[-keep:]
    return list(skill) + ids, [0] * len(skill) + mask


# ----------------------------------------------------------------------------------------- batching
def left_pad(seqs, pad_id: int, masks=None, dtype=torch.bool):
    """Left-padded batch: input_ids, attention_mask, position_ids (0 from the first real token)
    and, when ``masks`` is given, the padded per-token values (loss masks; ``dtype``, 0 on padding).
    All [B, L]."""
    if not seqs:
        raise ValueError("seqs must not be empty")
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    attn = torch.zeros((len(seqs), width), dtype=torch.long)
    lm = torch.zeros((len(seqs), width), dtype=dtype)
    for i, s in enumerate(seqs):
        if len(s):
            ids[i, width - len(s):] = torch.as_tensor(s, dtype=torch.long)
            attn[i, width - len(s):] = 1
            if masks is not None:
                lm[i, width - len(s):] = torch.as_tensor(masks[i], dtype=dtype)
    pos = (attn.cumsum(-1) - 1).clamp_min(0)
    return ids, attn, pos, lm


def shifted_rows(x: torch.Tensor, student_width: int) -> torch.Tensor:
    """Columns of a left-padded [B, L, ...] batch that predict the student's tokens 1..S-1.

    For the student batch (L = S) this is ``x[:, :-1]``; for the teacher batch (L = T >= S) it is
    ``x[:, T-S : T-1]``: the same student token in every row, because both batches are right-aligned.
    """
    width = x.shape[1]
    if width < student_width:
        raise ValueError(f"teacher width {width} is shorter than the student width {student_width}")
    return x[:, width - student_width: width - 1]


@dataclass
class Batch:
    """A collated list of samples. ``select`` [B, S-1] marks the loss tokens on the shifted grid."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    position_ids: torch.Tensor
    labels: torch.Tensor          # [N] the student's sampled tokens (loss tokens only)
    select: torch.Tensor          # [B, S-1] bool
    token_row: torch.Tensor       # [N] index (within the collated list) of every loss token's sample
    token_step: torch.Tensor      # [N] environment step (turn index) of every loss token
    teacher: tuple | None = None  # (input_ids, attention_mask, position_ids) of the teacher batch

    @property
    def num_tokens(self) -> int:
        return int(self.labels.numel())

    def to(self, device):
        move = lambda t: t.to(device)  # noqa: E731
        teacher = tuple(map(move, self.teacher)) if self.teacher is not None else None
        return Batch(*(move(t) for t in (self.input_ids, self.attention_mask, self.position_ids,
                                         self.labels, self.select, self.token_row, self.token_step)), teacher)


def collate(samples, pad_id: int, *, with_teacher: bool = True, max_teacher_len=None,
            max_skill_tokens=None) -> Batch:
    ids, attn, pos, lm = left_pad([s.ids for s in samples], pad_id, [s.loss_mask for s in samples])
    select = lm[:, 1:]
    labels = ids[:, 1:][select]
    row = torch.arange(len(samples))[:, None].expand_as(select)[select]
    _, _, _, steps = left_pad([s.ids for s in samples], pad_id, [[t + 1 for t in s.steps] for s in samples],
                              dtype=torch.long)
    step = steps[:, 1:][select] - 1
    teacher = None
    if with_teacher:
        t_seqs, t_masks = zip(*(teacher_sequence(s, max_teacher_len=max_teacher_len,
                                                 max_skill_tokens=max_skill_tokens) for s in samples))
        t_ids, t_attn, t_pos, t_lm = left_pad(list(t_seqs), pad_id, list(t_masks))
        # realignment invariant: the teacher's targets on the shifted grid are exactly the student's
        width = ids.shape[1]
        t_targets = t_ids[:, t_ids.shape[1] - width + 1:]
        if not (torch.equal(t_lm[:, t_lm.shape[1] - width + 1:], select)
                and torch.equal(t_targets[select], labels)):
            raise RuntimeError("teacher batch is not aligned with the student's tokens")
        teacher = (t_ids, t_attn, t_pos)
    return Batch(ids, attn, pos, labels, select, row, step, teacher)


# ----------------------------------------------------------------------------------------- advantages
def grpo_advantages(scores, groups, episodes=None, *, cross_steps: bool = True, eps: float = 1e-6,
                    norm_by_std: bool = True) -> torch.Tensor:
    """GRPO outcome advantages, one per row: (score - mean_g) / (std_g + eps) within each group g.

    A row is one training sample (in the released layout: one environment step of an episode).
    ``episodes`` names the episode of every row (default: every row its own episode). The group's mean
    and std come from every row (``cross_steps=True``, verl-agent's default
    ``compute_mean_std_cross_steps``: an episode of 6 steps weighs 6 times) or from the first row of each
    episode (``cross_steps=False``: one score per episode); every row is then normalised with its own
    score. std is the unbiased standard deviation (torch.std, as verl); a group with a single score gets
    mean 0, std 1 (verl's convention). ``norm_by_std=False`` is Dr.GRPO (mean-centred only).
    """
    r = torch.as_tensor(scores, dtype=torch.float32)
    g = torch.as_tensor(groups, dtype=torch.long)
    e = torch.arange(len(r)) if episodes is None else torch.as_tensor(episodes, dtype=torch.long)
    if r.dim() != 1 or r.shape != g.shape or r.shape != e.shape:
        raise ValueError(f"scores, groups and episodes must be 1-D of the same length, got {tuple(r.shape)}, "
                         f"{tuple(g.shape)} and {tuple(e.shape)}")
    counted = torch.ones_like(r, dtype=torch.bool)
    if not cross_steps:   # the first row of every (group, episode) pair stands for the episode
        seen = set()
        for i, key in enumerate(zip(g.tolist(), e.tolist())):
            counted[i] = key not in seen
            seen.add(key)
    adv = torch.zeros_like(r)
    for k in torch.unique(g).tolist():
        idx = g == k
        x = r[idx & counted]
        mean, std = (x.mean(), x.std()) if x.numel() > 1 else (torch.tensor(0.0), torch.tensor(1.0))
        adv[idx] = (r[idx] - mean) / (std + eps) if norm_by_std else r[idx] - mean
    return adv
