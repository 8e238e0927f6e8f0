"""Exact gradient accumulation over the global contrastive batch (`trainer.accum_steps=K`).

Contrastive losses do not decompose over micro-batches: every sample is a negative for every
other, so summing per-micro-batch losses changes the objective. This is the exact method of
GradCache (Gao et al. 2021) and open_clip's `--accum-freq`: each rank splits its share of the
global batch into K micro-batches and

  1. forwards every micro-batch without autograd and caches the outputs the loss needs
     (pooled features, FILIP token features and masks, CoCa caption logits, teacher features);
  2. runs the loss once over the rank's whole share (so across ranks, over the whole global
     batch, exactly as with K = 1) and takes d(loss)/d(every cached output) and the gradients of
     the loss's own parameters (temperature, bias) with `torch.autograd.grad`;
  3. forwards each micro-batch again with autograd and backpropagates its slice of the cached
     output gradients through DeepSpeed (`engine.backward` on Σ output · gradient);
  4. lets DeepSpeed step once: it runs with `gradient_accumulation_steps = K`, so only the last
     micro-batch is a boundary, where gradients are reduced, clipped and the optimizer and the
     learning-rate schedule step.

Whatever is random inside the towers (FLIP patch dropout, dropout) is replayed: the RNG state
before each micro-batch's first forward is restored before its second, so the gradient belongs
to the same sample. Peak activation memory is one micro-batch's, plus the cached outputs.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

# Outputs that depend on trainable weights: their gradients are cached and backpropagated.
DIFFERENTIABLE = ("image", "text", "image_tokens", "text_tokens", "caption_logits")
# Outputs that are one value per step rather than one row per sample.
PER_STEP = ("teacher_logit_scale", "image_mask")


def _rng_state(device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cuda = torch.cuda.get_rng_state(device) if device.type == "cuda" else None
    return torch.get_rng_state(), cuda


def _set_rng_state(state: tuple[torch.Tensor, torch.Tensor | None], device: torch.device) -> None:
    torch.set_rng_state(state[0])
    if state[1] is not None:
        torch.cuda.set_rng_state(state[1], device)


def split_batch(batch: Mapping[str, torch.Tensor], parts: int) -> list[dict[str, torch.Tensor]]:
    """A batch dict (dim 0 = the sample in every tensor) as `parts` micro-batch dicts."""
    chunks = {name: value.chunk(parts) for name, value in batch.items()}
    return [{name: pieces[i] for name, pieces in chunks.items()} for i in range(len(next(iter(chunks.values()))))]


def join_outputs(micro: Sequence[dict]) -> dict:
    """Concatenates K micro-batches' outputs along the batch; per-step outputs come from the first."""
    joined = {}
    for name, first in micro[0].items():
        if name in PER_STEP or first is None:
            joined[name] = first
        else:
            joined[name] = torch.cat([out[name] for out in micro])
    return joined


class CachedGradientStep:
    """One training step of a DeepSpeed engine as K micro-batches, with the gradient of one K = 1 step.

    The engine wraps a `ContrastiveObjective` and was initialized with
    `gradient_accumulation_steps = micro_batches`. Use: `loss, metrics = step.forward(batch)`,
    then (after any check on the loss) `step.backward()`, then `step.optimizer_step()`.
    """

    def __init__(self, engine, micro_batches: int):
        self.engine = engine
        self.micro_batches = micro_batches
        self._pending: list | None = None

    def forward(self, batch: Mapping[str, torch.Tensor]) -> tuple[torch.Tensor, dict]:
        """batch: this rank's share as a dict of tensors (`ContrastiveObjective`), on the engine's
        device -> (rank loss, detached; metrics). Computes and keeps every output gradient for `backward`."""
        objective, device = self.engine.module, torch.device(self.engine.device)
        micro = split_batch(batch, self.micro_batches)
        rng, cached = [], []
        with torch.no_grad():
            for micro_batch in micro:
                rng.append(_rng_state(device))
                cached.append(self.engine(micro_batch, outputs_only=True))
        joined = join_outputs(cached)
        # Every text role's features [b, K, D] are cached like `text`: GradCache over all texts.
        # Every image head's and text projection's features too (`image@perceptual`, `text_long@perceptual`).
        differentiable = (*DIFFERENTIABLE, *objective.role_features())
        leaves = [name for name in differentiable if joined.get(name) is not None]
        leaves += [name for name, value in joined.items()
                   if "@" in name and name.partition("@")[0] in differentiable and value is not None]
        for name in leaves:
            joined[name] = joined[name].detach().requires_grad_(True)
        loss, metrics = objective.loss(**joined)
        params = [p for p in objective.loss.parameters() if p.requires_grad]
        # autograd.grad, not backward: nothing lands in .grad, and DeepSpeed's hooks stay quiet
        # until the micro-batch backwards below.
        grads = torch.autograd.grad(loss, [joined[name] for name in leaves] + params, allow_unused=True)
        sizes = [len(micro_batch["image"]) for micro_batch in micro]
        feature_grads = {name: (torch.zeros_like(joined[name]) if g is None else g).split(sizes)
                         for name, g in zip(leaves, grads[:len(leaves)])}
        param_grads = [torch.zeros_like(p) if g is None else g for p, g in zip(params, grads[len(leaves):])]
        self._pending = [micro, rng, feature_grads, list(zip(params, param_grads)), _rng_state(device)]
        return loss.detach(), metrics

    def backward(self) -> None:
        """Re-forwards each micro-batch (same RNG as its first forward) and backpropagates its
        slice of the cached gradients; every micro-batch but the last is a DeepSpeed non-boundary."""
        micro, rng, feature_grads, param_grads, after = self._pending
        device = torch.device(self.engine.device)
        for k, micro_batch in enumerate(micro):
            _set_rng_state(rng[k], device)
            out = self.engine(micro_batch, outputs_only=True)
            surrogate = sum((out[name] * grads[k].to(out[name].dtype)).sum() for name, grads in feature_grads.items())
            # The loss's own parameters get their gradient once; the zero weight elsewhere keeps them
            # in every backward, as DeepSpeed's gradient hooks expect of a trainable parameter.
            surrogate = surrogate + sum((p * g * float(k == 0)).sum() for p, g in param_grads)
            self.engine.backward(surrogate, scale_wrt_gas=False)
            if k < len(micro) - 1:
                self.engine.step()   # not a boundary: DeepSpeed only counts the micro-step
        _set_rng_state(after, device)

    def optimizer_step(self) -> None:
        """The boundary step: gradient reduction, clipping, optimizer and schedule (DeepSpeed)."""
        self.engine.step()
        self._pending = None
