"""The fused-linear SDAR loss: hidden states + lm_head weight in, never the full logits. See README.md."""

from .chunking import chunk_rows
from .function import linear_sdar_loss
from .reference import linear_sdar_loss_reference

__all__ = ["linear_sdar_loss", "linear_sdar_loss_reference", "chunk_rows"]
