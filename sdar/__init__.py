"""sdar: the trainer-facing side of sdar-kernels (config, loss modules; training loop to come)."""

from .config import SDARConfig
from .loss import SDARLoss
from .linear_loss import LinearSDARLoss

__all__ = ["SDARConfig", "SDARLoss", "LinearSDARLoss"]
