"""sdar: the trainer-facing side of sdar-kernels (config, loss modules, the thin training loop; README.md)."""

from .config import SDARConfig
from .loss import SDARLoss
from .linear_loss import LinearSDARLoss
from .env import TowerConfig, TowerEnv, make_instance
from .trainer import TrainConfig, Trainer, train

__all__ = ["SDARConfig", "SDARLoss", "LinearSDARLoss", "TowerConfig", "TowerEnv", "make_instance",
           "TrainConfig", "Trainer", "train"]
