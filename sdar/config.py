"""SDAR training configuration: the official hyperparameters (docs/api.md, "Defaults: whose are they")."""

from __future__ import annotations

from dataclasses import asdict, dataclass, replace

from sdar_kernels import SDAROptions


@dataclass(frozen=True)
class SDARConfig:
    """Loss hyperparameters of SDAR with the released code's defaults.

    ``method`` presets: "sdar" (gate_beta 5), "grpo_opsd" (gate_beta 0: the gate is a constant 0.5),
    "grpo" (no distillation), "opsd" (no policy-gradient term); see :meth:`for_method`.
    """

    gate_beta: float = 5.0
    distill_coef: float = 0.01
    distill: str = "sampled"
    jsd_beta: float = 0.5
    clip_low: float = 0.2
    clip_high: float = 0.2
    clip_ratio_c: float | None = 3.0
    kl_coef: float = 0.01
    entropy_coef: float = 0.001
    temperature: float = 1.0
    loss_agg_mode: str = "token-mean"
    group_size: int = 8
    use_policy_gradient: bool = True

    def __post_init__(self):
        # the loss's own validation (ValueError naming the field), at construction instead of at the
        # first loss call; the fields repeat SDAROptions' because the training defaults differ
        # (kl_coef 0.01, entropy_coef 0.001 where the functional API leaves both off)
        SDAROptions(**self.loss_kwargs())

    def loss_kwargs(self) -> dict:
        """Keyword arguments for ``sdar_kernels.sdar_loss`` / ``linear_sdar_loss``."""
        d = asdict(self)
        d.pop("group_size")
        d.pop("use_policy_gradient")
        return d

    @classmethod
    def for_method(cls, method: str, **overrides) -> "SDARConfig":
        presets = {
            "sdar": {},
            "grpo_opsd": {"gate_beta": 0.0},
            "grpo": {"distill_coef": 0.0},
            "opsd": {"use_policy_gradient": False},
        }
        if method not in presets:
            raise ValueError(f"method must be one of {tuple(presets)}, got {method!r}")
        return replace(cls(**presets[method]), **overrides)
