"""sdar: the trainer-facing side of sdar-kernels (config, loss modules; training loop to come)."""

from .config import SDARConfig
from .loss import SDARLoss

__all__ = ["SDARConfig", "SDARLoss"]
