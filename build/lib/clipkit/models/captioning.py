"""Caption generation from an open_clip CoCa model: greedy and beam search.

open_clip's own `CoCa.generate` needs Hugging Face `transformers` for its beam search; this
module needs nothing beyond the model. The image is encoded once; each step re-runs the
text tower and decoder on the prefix (no KV cache: CoCa's text tower appends a CLS token,
so every prefix is a fresh sequence). Used by the `captioning` eval task.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import nn

# [n, t] token-id prefixes -> [n, V] float32 log-probabilities of the next token.
NextLogProbs = Callable[[torch.Tensor], torch.Tensor]


def greedy_search(next_logprobs: NextLogProbs, batch: int, *, sot_id: int, eot_id: int, max_len: int,
                  device: torch.device | str = "cpu") -> list[list[int]]:
    """Per sequence, the argmax token at every step until EOT or `max_len` tokens (SOT and EOT
    included); returns the ids between SOT and EOT."""
    prefix = torch.full((batch, 1), sot_id, dtype=torch.long, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    for _ in range(max_len - 1):
        nxt = next_logprobs(prefix).argmax(dim=-1)
        nxt = torch.where(done, torch.full_like(nxt, eot_id), nxt)
        prefix = torch.cat([prefix, nxt[:, None]], dim=1)
        done |= nxt == eot_id
        if bool(done.all()):
            break
    return [_strip(row.tolist(), eot_id) for row in prefix]


def beam_search(next_logprobs: NextLogProbs, *, sot_id: int, eot_id: int, max_len: int, beams: int,
                length_penalty: float = 1.0, device: torch.device | str = "cpu") -> list[int]:
    """One sequence by beam search: `beams` open hypotheses per step; an ended hypothesis is
    ranked by its log-probability / (tokens after SOT) ** length_penalty; stops when `beams`
    have ended (Hugging Face's early_stopping=True) or at `max_len`."""
    if max_len < 2 or beams < 1:
        raise ValueError(f"need max_len >= 2 and beams >= 1, got {max_len} and {beams}")
    prefixes = torch.full((1, 1), sot_id, dtype=torch.long, device=device)
    scores = torch.zeros(1, device=device)
    finished: list[tuple[float, list[int]]] = []
    for _ in range(max_len - 1):
        logprobs = next_logprobs(prefixes)
        vocab = logprobs.shape[1]
        total = (scores[:, None] + logprobs).flatten()
        top_scores, top = total.topk(min(2 * beams, total.numel()))
        open_prefixes, open_scores = [], []
        for score, flat in zip(top_scores.tolist(), top.tolist()):
            row, token = divmod(flat, vocab)
            candidate = prefixes[row].tolist() + [token]
            if token == eot_id:
                finished.append((score / (len(candidate) - 1) ** length_penalty, candidate))
            elif len(open_prefixes) < beams:
                open_prefixes.append(candidate)
                open_scores.append(score)
        if not open_prefixes or len(finished) >= beams:
            break
        prefixes = torch.tensor(open_prefixes, dtype=torch.long, device=device)
        scores = torch.tensor(open_scores, device=device)
    else:  # max_len reached: the open hypotheses compete as they are
        finished += [(s / (prefixes.shape[1] - 1) ** length_penalty, p)
                     for s, p in zip(scores.tolist(), prefixes.tolist())]
    return _strip(max(finished, key=lambda f: f[0])[1], eot_id)


def _strip(ids: list[int], eot_id: int) -> list[int]:
    ids = ids[1:]  # SOT
    return ids[:ids.index(eot_id)] if eot_id in ids else ids


def coca_next_logprobs(model: nn.Module, image_latent: torch.Tensor, image_embs: torch.Tensor) -> NextLogProbs:
    """Next-token log-probabilities of a CoCa for one encoded image batch (prefix rows = images,
    or one image broadcast over several beams)."""
    def fn(prefix: torch.Tensor) -> torch.Tensor:
        n = prefix.shape[0]
        latent, embs = (image_latent, image_embs) if image_latent.shape[0] == n else \
            (image_latent.expand(n, -1), image_embs.expand(n, -1, -1))
        out = model(None, prefix, image_latent=latent, image_embs=embs, output_labels=False)
        return F.log_softmax(out["logits"][:, -1].float(), dim=-1)
    return fn


@torch.no_grad()
def generate_captions(model: nn.Module, images: torch.Tensor, *, sot_id: int, eot_id: int, max_len: int,
                      beams: int = 1, length_penalty: float = 1.0) -> list[list[int]]:
    """Token ids of one caption per image (SOT/EOT stripped) from a CoCa in eval mode.

    Args:
        images: [b, 3, H, W]. max_len: most tokens per caption, SOT and EOT included (the
            text context length). beams: 1 = greedy; k > 1 = beam search with k hypotheses.
    """
    image_latent, image_embs = model._encode_image(images)
    if beams == 1:
        return greedy_search(coca_next_logprobs(model, image_latent, image_embs), images.shape[0],
                             sot_id=sot_id, eot_id=eot_id, max_len=max_len, device=images.device)
    return [beam_search(coca_next_logprobs(model, image_latent[i:i + 1], image_embs[i:i + 1]), sot_id=sot_id,
                        eot_id=eot_id, max_len=max_len, beams=beams, length_penalty=length_penalty,
                        device=images.device) for i in range(images.shape[0])]
