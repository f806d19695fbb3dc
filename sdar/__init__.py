"""sdar: the trainer-facing side of sdar-kernels (config, loss modules, the thin training loop; README.md)."""

from .config import SDARConfig
from .loss import SDARLoss
from .linear_loss import LinearSDARLoss
from .task import Env, Instance, Task, Turn, WarmupExample
from .towers import Towers, TowersConfig
from .trainer import TrainConfig, Trainer, train

__all__ = ["SDARConfig", "SDARLoss", "LinearSDARLoss", "Task", "Env", "Instance", "Turn", "WarmupExample",
           "Towers", "TowersConfig", "TrainConfig", "Trainer", "train"]
