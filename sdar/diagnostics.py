"""Gate diagnostics that say what the gate agrees with: per token category, not over every loss token.

``sdar_loss``'s own ``gate_mean`` / ``gate_active_ratio`` average over every loss token. In a task whose
answers are one word and an end-of-sequence token, about half of those tokens are EOS, where student and
teacher agree (gap ~0), so their gate sits near sigmoid(0) = 0.5 and "active" (gate > 0.5) flips with
rounding. Here the loss tokens are split by what they are:

- ``eos``: the end-of-sequence token (a format token);
- action tokens, by the step's outcome x the episode's retrieved skill:
  ``{right, wrong, invalid}-{correct, wrong, irrelevant}``, e.g. ``right-correct``: the student took the
  right action and the teacher read a correct skill (the gate should open), ``wrong-correct``: a wrong
  action the teacher knows is wrong (gate ~0 at beta 5), ``right-wrong``: a right action the misled
  teacher rejects (the case the gate is meant to protect).

For each category the trainer logs ``gate/<cat>``, ``gap/<cat>`` (means over its tokens) and
``tokens/<cat>`` (its token count), plus ``gate_active_action`` (gate > 0.5 on action tokens only).
"""

from __future__ import annotations

from collections import defaultdict

OUTCOMES = ("right", "wrong", "invalid")


def outcome(turn) -> str:
    return "invalid" if not turn.valid else "right" if turn.correct else "wrong"


class GateStats:
    """Accumulates per-category gate / gap sums over the micro-batches of one training step."""

    def __init__(self, eos_id: int):
        self.eos_id = eos_id
        self.sum_gate = defaultdict(float)
        self.sum_gap = defaultdict(float)
        self.count = defaultdict(int)
        self.active = 0

    def add(self, batch, samples, gate, gap) -> None:
        """``batch``: the collated ``samples``; ``gate`` / ``gap``: the loss's per-token outputs [N]."""
        gate, gap = gate.detach().float().cpu().tolist(), gap.detach().float().cpu().tolist()
        for r, t, y, g, d in zip(batch.token_row.tolist(), batch.token_step.tolist(), batch.labels.tolist(),
                                 gate, gap):
            if y == self.eos_id:
                cat = "eos"
            else:
                meta = samples[r].meta
                cat = f"{meta['outcomes'][t]}-{meta['skill_kind']}"
                self.active += g > 0.5
            self.sum_gate[cat] += g
            self.sum_gap[cat] += d
            self.count[cat] += 1

    @classmethod
    def merged(cls, parts) -> "GateStats":
        """One GateStats holding the sums of ``parts`` (e.g. every data-parallel rank's)."""
        out = cls(parts[0].eos_id)
        for p in parts:
            for cat, n in p.count.items():
                out.sum_gate[cat] += p.sum_gate[cat]
                out.sum_gap[cat] += p.sum_gap[cat]
                out.count[cat] += n
            out.active += p.active
        return out

    def metrics(self) -> dict:
        out = {}
        for cat, n in sorted(self.count.items()):
            out[f"gate/{cat}"] = self.sum_gate[cat] / n
            out[f"gap/{cat}"] = self.sum_gap[cat] / n
            out[f"tokens/{cat}"] = n
        actions = sum(n for cat, n in self.count.items() if cat != "eos")
        if actions:
            out["gate_active_action"] = self.active / actions
        return out
