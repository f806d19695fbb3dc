"""The fused SDAR loss from logits. Math: README.md in this folder; API: docs/api.md."""

from .function import sdar_loss
from .options import SDAROptions
from .output import METRIC_NAMES, SDAROutput
from .reference import sdar_loss_reference

__all__ = ["sdar_loss", "sdar_loss_reference", "SDAROutput", "SDAROptions", "METRIC_NAMES"]
