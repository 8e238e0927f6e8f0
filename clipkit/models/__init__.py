"""Two-tower models from open_clip_torch. No loss and no collectives live here."""

from clipkit.models.factory import (
                                    ModelBundle,
                                    build_model,
                                    build_teacher_model,
                                    compile_towers,
                                    lock_towers,
                                    open_clip_config,
)

__all__ = ["ModelBundle", "build_model", "compile_towers", "build_teacher_model", "lock_towers", "open_clip_config"]
