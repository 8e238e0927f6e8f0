"""Contrastive losses. Each owns its temperature/bias; `functional` is the plain reference math."""

from clipkit.losses.clip import ClipLoss
from clipkit.losses.siglip import SigLipLoss

__all__ = ["ClipLoss", "SigLipLoss"]
