"""Captioning eval for CoCa models: teacher-forced caption cross-entropy and, on generated
captions, BLEU-4 and CIDEr (the COCO caption metrics, from `pycocoevalcap`'s pure-Python
scorers; its Java PTB tokenizer is replaced by lower-casing and splitting on non-words).

Selected per eval set with `tasks: [..., captioning]` (the set needs captions).
"""

from __future__ import annotations

import re
from collections.abc import Iterable

import torch
from torch import nn

from clipkit import distributed
from clipkit.data.eval_reader import EvalBatch
from clipkit.losses.functional import caption_loss
from clipkit.models.captioning import generate_captions


def _words(text: str) -> str:
    return " ".join(re.findall(r"[a-z0-9]+", text.lower()))


def corpus_scores(generated: list[str], references: list[list[str]]) -> dict[str, float]:
    """BLEU-4 and CIDEr of generated captions against each image's references (COCO style)."""
    try:
        from pycocoevalcap.bleu.bleu import Bleu
        from pycocoevalcap.cider.cider import Cider
    except ImportError:  # only the caption CE is reported then; say so once
        import logging

        logging.getLogger(__name__).warning("pycocoevalcap is not installed: no BLEU-4/CIDEr (pip install pycocoevalcap)")
        return {}
    res = {i: [_words(g)] for i, g in enumerate(generated)}
    gts = {i: [_words(r) for r in refs] for i, refs in enumerate(references)}
    bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
    cider, _ = Cider().compute_score(gts, res)
    return {"bleu4": float(bleu[3]), "cider": float(cider)}


@torch.no_grad()
def evaluate_captioning(model: nn.Module, batches: Iterable[EvalBatch], tokenizer, *, device: torch.device,
                        beams: int = 1, pad_id: int = 0) -> tuple[dict[str, float], list[dict[str, object]]]:
    """Mean caption token CE (over every reference caption, pad ignored) and generated-caption
    BLEU-4/CIDEr for an open_clip CoCa `model` in eval mode. With several ranks each scores
    its share of `batches` and the sums and captions are gathered: every rank gets the
    1-process result. (Greedy decoding stops early per batch, so forwards are not in
    lockstep across ranks: not for ZeRO-3 multi-rank runs, which `check_captioning` refuses.)

    Returns ({"caption_ce", "bleu4", "cider"}, [{"generated", "references"} per image]).
    """
    ce_sum, tokens_seen = 0.0, 0
    generated, references = [], []
    for batch in batches:
        images = batch.images.to(device)
        captions = [c for caps in batch.captions for c in caps]
        owners = [i for i, caps in enumerate(batch.captions) for _ in caps]
        if not captions:
            continue
        text = tokenizer(captions).to(device)
        out = model(images[owners], text)
        count = int((out["labels"] != pad_id).sum())
        ce_sum += float(caption_loss(out["logits"].float(), out["labels"], pad_id)) * count
        tokens_seen += count
        ids = generate_captions(model, images, sot_id=tokenizer.sot_token_id, eot_id=tokenizer.eot_token_id,
                                max_len=text.shape[1], beams=beams)
        generated += [tokenizer.decode(seq).strip() for seq in ids]
        references += [list(caps) for caps in batch.captions]
    shares = distributed.all_gather_object((ce_sum, tokens_seen, generated, references))
    ce_sum, tokens_seen = sum(s[0] for s in shares), sum(s[1] for s in shares)
    generated = [g for s in shares for g in s[2]]
    references = [r for s in shares for r in s[3]]
    metrics = {"caption_ce": ce_sum / max(tokens_seen, 1), **corpus_scores(generated, references)}
    return metrics, [{"generated": g, "references": r} for g, r in zip(generated, references)]
