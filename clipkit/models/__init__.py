"""Two-tower models from open_clip_torch. No loss and no collectives live here."""

from clipkit.models.factory import ModelBundle, build_model, open_clip_config

__all__ = ["ModelBundle", "build_model", "open_clip_config"]
