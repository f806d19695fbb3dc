"""The hyperparameters of one SDAR loss call, validated once and frozen.

Defaults are the official SDAR ones (docs/api.md, "Defaults: whose are they") except kl_coef and entropy_coef,
which the functional API leaves off (0) so that a call without ``ref_logprobs`` is valid;
``sdar.SDARConfig`` carries the official 0.01 / 0.001 for training.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

DISTILL_MODES = ("sampled", "reinforce", "fkl", "rkl", "jsd")
FULL_VOCAB_DISTILL = ("fkl", "rkl", "jsd")
LOSS_AGG_MODES = ("token-mean", "token-sum", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")
REDUCTIONS = ("mean", "sum", "none")
BACKENDS = ("auto", "triton", "torch")


@dataclass(frozen=True)
class SDAROptions:
    gate_beta: float = 5.0
    distill_coef: float = 0.01
    distill: str = "sampled"
    jsd_beta: float = 0.5
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    kl_coef: float = 0.0
    entropy_coef: float = 0.0
    temperature: float = 1.0
    loss_agg_mode: str = "token-mean"
    reduction: str = "mean"
    inplace_backward: bool = False
    backend: str = "auto"

    def __post_init__(self):
        for name in ("gate_beta", "distill_coef", "jsd_beta", "clip_low", "clip_high", "kl_coef",
                     "entropy_coef", "temperature"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise ValueError(f"{name} must be a finite number, got {value!r}")
            object.__setattr__(self, name, float(value))
        if self.clip_ratio_c is not None:
            c = self.clip_ratio_c
            if isinstance(c, bool) or not isinstance(c, (int, float)) or not math.isfinite(c) or c <= 1.0:
                raise ValueError(f"clip_ratio_c must be None or a finite number > 1, got {c!r}")
            object.__setattr__(self, "clip_ratio_c", float(c))
        _positive("temperature", self.temperature)
        _non_negative("gate_beta", self.gate_beta)
        _non_negative("clip_low", self.clip_low)
        _non_negative("clip_high", self.clip_high)
        _non_negative("kl_coef", self.kl_coef)
        if self.clip_low >= 1.0:
            raise ValueError(f"clip_low must be < 1 (the ratio's lower bound is 1 - clip_low), got {self.clip_low}")
        if not 0.0 <= self.jsd_beta <= 1.0:
            raise ValueError(f"jsd_beta must be in [0, 1], got {self.jsd_beta}")
        _one_of("distill", self.distill, DISTILL_MODES)
        _one_of("loss_agg_mode", self.loss_agg_mode, LOSS_AGG_MODES)
        _one_of("reduction", self.reduction, REDUCTIONS)
        _one_of("backend", self.backend, BACKENDS)
        if not isinstance(self.inplace_backward, bool):
            raise ValueError(f"inplace_backward must be a bool, got {self.inplace_backward!r}")

    @property
    def full_vocab_distill(self) -> bool:
        return self.distill in FULL_VOCAB_DISTILL

    @property
    def divergence(self) -> str:
        """The divergence actually computed: jsd with beta 0 / 1 is fkl / rkl (TRL's convention)."""
        if self.distill == "jsd" and self.jsd_beta == 0.0:
            return "fkl"
        if self.distill == "jsd" and self.jsd_beta == 1.0:
            return "rkl"
        return self.distill


def _one_of(name, value, allowed):
    if value not in allowed:
        raise ValueError(f"{name} must be one of {allowed}, got {value!r}")


def _positive(name, value):
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value}")


def _non_negative(name, value):
    if value < 0:
        raise ValueError(f"{name} must be >= 0, got {value}")
