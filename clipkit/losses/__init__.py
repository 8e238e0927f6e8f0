"""Contrastive losses. Each owns its temperature/bias (a `LogitScale`) and declares in `needs`
the model outputs its forward takes; `functional` is the plain reference math and `fused`
the global-batch losses over ranks (every collective a loss uses)."""

from clipkit.losses.clip import ClipLoss
from clipkit.losses.coca import CocaLoss
from clipkit.losses.distill import DistillLoss
from clipkit.losses.filip import FilipLoss
from clipkit.losses.logit_scale import LogitScale
from clipkit.losses.multi_text import MultiTextLoss
from clipkit.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "CocaLoss", "DistillLoss", "FilipLoss", "LogitScale", "MultiTextLoss", "SigLipLoss"]
