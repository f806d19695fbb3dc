"""sdar: the trainer-facing side of sdar-kernels (config, loss modules, the thin training loop; README.md).

``sdar.hf`` (Hugging Face helpers for the fused-linear loss) is imported here so that ``import sdar`` is
enough to reach it; it needs only torch (the model you pass comes from transformers).
"""

from . import hf
from .config import SDARConfig
from .loss import SDARLoss
from .linear_loss import LinearSDARLoss
from .task import Env, Instance, Task, Turn, WarmupExample
from .towers import Towers, TowersConfig
from .trainer import TrainConfig, Trainer, train

__all__ = ["hf", "SDARConfig", "SDARLoss", "LinearSDARLoss", "Task", "Env", "Instance", "Turn", "WarmupExample",
           "Towers", "TowersConfig", "TrainConfig", "Trainer", "train"]
