"""Contrastive losses. Each owns its temperature/bias and declares in `needs` the model
outputs its forward takes; `functional` is the plain reference math."""

from clipkit.losses.clip import ClipLoss
from clipkit.losses.coca import CocaLoss
from clipkit.losses.distill import DistillLoss
from clipkit.losses.filip import FilipLoss
from clipkit.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "CocaLoss", "DistillLoss", "FilipLoss", "SigLipLoss"]
