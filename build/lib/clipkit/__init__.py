"""clipkit: contrastive image-text pretraining (CLIP, SigLIP, CoCa, FILIP, LiT, FLIP, distillation)
on webdataset shards under DeepSpeed, scored with FAISS. Towers, tokenizer and weights come from
open_clip_torch, and clipkit reads and writes open_clip checkpoints.

Importing the package is cheap (no torch): the entry points are `clipkit.train`, `clipkit.evaluate`,
`clipkit.shards` and `clipkit.export`; the Hydra configs ship inside it (`clipkit.config.CONF_DIR`).
"""

__version__ = "0.2.0"
