"""Towers + loss as one module: the thing DeepSpeed wraps, so the loss's temperature and
bias are optimized, clipped, checkpointed and ZeRO-partitioned like every other weight.

The loss declares in `loss.needs` which model outputs its forward takes (by name); this
module computes exactly those (`OUTPUTS` lists what it can make) and nothing else.
With extra image heads (`model.heads`, `clipkit.models.heads`) the pooled outputs exist once per
head: `image@<head>`, `text@<head>` and `text_<r>@<head>` (the texts in that head's text
projection); the plain names are the semantic head's. One trunk pass and one text tower pass
serve every head.
Per-step training behaviours live here too, driven by `on_step(step)` so that they are the
same on every rank and after a resume: TailDrop's k (`model.tail_drop_max`) and the end of
FLIP patch dropout for the unmasked tuning phase (`model.unmasked_tuning_steps`).
"""

from __future__ import annotations

import random
from collections.abc import Mapping
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.models.heads import SEMANTIC, head_names, head_output, split_head
from clipkit.models.outputs import (
    encode_image_parts,
    encode_text_pooled,
    image_token_features,
    is_coca,
    is_vision_transformer,
    project_text,
    tail_drop,
    text_pooled_unprojected,
    text_token_features,
)

_TOKEN_MODEL = "a ViT CLIP without an attentional pooler (model=tiny_vit)"
_COCA_MODEL = "a CoCa model (model=tiny_coca)"
_TEACHER = "model.teacher (model=tiny_distill)"


@dataclass(frozen=True)
class Output:
    """One named model output a loss may need: what it is, its shape, and which model gives it."""

    what: str
    shape: str
    given_by: str = "any model"


OUTPUTS = {
    "image": Output("pooled image features", "[b, D], L2-normalized"),
    "text": Output("pooled text features", "[b, D], L2-normalized"),
    "image_tokens": Output("patch-token features", "[b, N, D], each L2-normalized", _TOKEN_MODEL),
    "image_mask": Output("the patch-token mask", "None (every patch token is real)", _TOKEN_MODEL),
    "text_tokens": Output("per-position text features", "[b, L, D], each L2-normalized", _TOKEN_MODEL),
    "text_mask": Output("the text-token mask", "[b, L] bool, True on real (non-pad) tokens", _TOKEN_MODEL),
    "caption_logits": Output("CoCa decoder logits", "[b, L-1, V]", _COCA_MODEL),
    "caption_labels": Output("the next tokens", "[b, L-1]", _COCA_MODEL),
    "teacher_image": Output("the frozen teacher's pooled image features", "[b, D_t]", _TEACHER),
    "teacher_text": Output("the frozen teacher's pooled text features", "[b, D_t]", _TEACHER),
    "teacher_logit_scale": Output("the teacher's exp(logit_scale)", "[1]", _TEACHER),
}
# Per text role r of `data.texts` (clipkit/data/texts.py), two more outputs, named after the role.
_ROLES = "data.texts with that role"


def role_outputs(role: str) -> dict[str, Output]:
    """The outputs of text role `role`: its features `text_<role>` and their mask `text_<role>_valid`."""
    return {f"text_{role}": Output(f"features of the {role!r} texts", "[b, K, D], L2-normalized", _ROLES),
            f"text_{role}_valid": Output(f"the mask of the {role!r} texts", "[b, K] bool, True on real texts", _ROLES)}


def output_info(name: str) -> Output:
    """What `name` is, for error messages: a fixed output or a text role's."""
    base, head = split_head(name)
    if head != SEMANTIC:
        info = output_info(base)
        return Output(f"{info.what} of the image head {head!r}", info.shape, "model.heads with that head")
    if name in OUTPUTS:
        return OUTPUTS[name]
    role = name[len("text_"):].removesuffix("_valid") if name.startswith("text_") else name
    return role_outputs(role).get(name, Output(name, "?", _ROLES))


def _loss_precision(x: torch.Tensor) -> torch.Tensor:
    """Features as the loss takes them: 16-bit and float32 towers give float32; a float64 tower
    (the parity tests' references) keeps float64."""
    return x.to(torch.promote_types(x.dtype, torch.float32))


def check_scored_heads(heads: tuple[str, ...], named: set[str], loss_name: str, model_name: str,
                       scoring: set[str] | None = None) -> None:
    """One-line ClipkitConfigError when the loss names an image head the model lacks (`named`: the
    heads of its outputs) or, with several heads, leaves one unscored (`scoring`: the heads whose
    image features it reads; default `named`). An untrained head would stay at its init, and
    DeepSpeed expects a gradient for every trainable parameter."""
    unknown = sorted(set(named) - set(heads))
    if unknown:
        raise ClipkitConfigError(
            f"loss={loss_name} scores the image head(s) {', '.join(unknown)}, which model={model_name} "
            f"does not have (model.heads: {', '.join(heads[1:]) or 'none'}); add them to model.heads, e.g. "
            f"'model.heads={{{unknown[0]}: {{pool: attn}}}}', or drop the terms' image keys")
    scoring = named if scoring is None else scoring
    unscored = [head for head in heads if head not in scoring]
    if len(heads) > 1 and unscored:
        raise ClipkitConfigError(
            f"model.heads: no term of loss={loss_name} scores the image head(s) {', '.join(unscored)}; "
            f"with several heads use loss=multi_text|multi_text_sigmoid and give each head a term, "
            f"e.g. 'loss.terms={{alt: {{texts: alt}}, long: {{texts: long, image: perceptual}}}}'")


class Teacher:
    """A frozen open_clip model for distillation: always eval mode and no grad.

    Deliberately not an nn.Module attribute of the objective: the teacher is not trained,
    not ZeRO-partitioned and not written into checkpoints.
    """

    def __init__(self, model: nn.Module):
        self.model = model.eval().requires_grad_(False)
        size = getattr(model.visual, "image_size", None)
        self.image_size = tuple(size) if isinstance(size, (tuple, list)) else size

    @torch.no_grad()
    def features(self, images: torch.Tensor, tokens: torch.Tensor):
        """-> (image [b, D_t], text [b, D_t], exp(logit_scale) [1]), all float32."""
        param = next(self.model.parameters())
        if param.device != images.device:
            self.model.to(images.device)
        images = images.to(param.dtype)
        if self.image_size is not None and tuple(images.shape[-2:]) != tuple(self.image_size):
            images = F.interpolate(images, size=self.image_size, mode="bicubic", align_corners=False)
        image = F.normalize(self.model.encode_image(images).float(), dim=-1)
        text = F.normalize(self.model.encode_text(tokens).float(), dim=-1)
        return image, text, self.model.logit_scale.detach().float().exp().reshape(1)


class ContrastiveObjective(nn.Module):
    """forward(batch) -> (loss scalar, metrics of detached scalars).

    The batch is a dict of tensors with the sample on dim 0 (`clipkit.data`): `image` [b,3,H,W]
    and either `text` [b,L] token ids (one caption per sample) or, per text role r of
    `data.texts`, `text_<r>` [b,K_r,L_r] token ids and `text_<r>_valid` [b,K_r] bool.
    `loss` may be None for eval-only use, where only `encode_image`/`encode_text` are called.
    """

    def __init__(self, model: nn.Module, loss: nn.Module | None, *, teacher: Teacher | None = None,
                 tail_drop_max: int = 0, unmasked_tuning_from_step: int | None = None, seed: int = 0,
                 pad_id: int = 0, text_roles: tuple[str, ...] = ()):
        super().__init__()
        self.model = model
        self.loss = loss
        self._teacher = teacher
        self.text_roles = tuple(text_roles)
        self.tail_drop_max = tail_drop_max
        self.unmasked_tuning_from_step = unmasked_tuning_from_step
        self.seed = seed
        self.pad_id = pad_id
        self.drop_last = 0

    def role_features(self) -> tuple[str, ...]:
        """The names of the text roles' feature outputs (`text_<r>`), differentiable like `text`."""
        return tuple(f"text_{role}" for role in self.text_roles)

    def heads(self) -> tuple[str, ...]:
        """The image heads: ("semantic", *`model.heads`)."""
        return head_names(self.model)

    def missing_outputs(self, needs: tuple[str, ...]) -> list[str]:
        """The names in `needs` this model and batch cannot produce (checked at build time)."""
        # An extra head's outputs (`image@h`, `text@h`, `text_<r>@h`) need the head and the pooled output.
        pooled = {"image", *self.role_features()} if self.text_roles else {"image", "text"}
        missing_heads = [name for name in needs if "@" in name
                         and (split_head(name)[1] not in self.heads() or split_head(name)[0] not in pooled)]
        needs = tuple(name for name in needs if "@" not in name)
        if self.text_roles:
            # With text roles the batch has no single `text`: the towers' per-caption outputs go.
            can = {"image"}
            for role in self.text_roles:
                can |= set(role_outputs(role))
            return [n for n in needs if n not in can] + missing_heads
        can = {"image", "text"}
        if is_vision_transformer(self.model.visual) and getattr(self.model.visual, "attn_pool", None) is None \
                and hasattr(self.model, "token_embedding"):
            can |= {"image_tokens", "image_mask", "text_tokens", "text_mask"}
        if is_coca(self.model):
            can |= {"caption_logits", "caption_labels"}
        if self._teacher is not None:
            can |= {"teacher_image", "teacher_text", "teacher_logit_scale"}
        return [n for n in needs if n not in can] + missing_heads

    def check_outputs(self, loss_name: str, model_name: str, needs: tuple[str, ...]) -> None:
        """Raises a one-line config error naming the model to use when `needs` asks for more
        than this model gives, or when the model has an image head that no loss term trains."""
        check_scored_heads(self.heads(), {split_head(name)[1] for name in needs}, loss_name, model_name,
                           scoring={split_head(name)[1] for name in needs if split_head(name)[0] == "image"})
        missing = self.missing_outputs(needs)
        if not missing:
            return
        roles = ", ".join(self.text_roles)
        unknown_roles = sorted({name[len("text_"):].removesuffix("_valid") for name in missing
                                if name.startswith("text_") and name not in OUTPUTS})
        if unknown_roles:
            have = f"it defines {roles}" if roles else "data.texts is null (one caption per sample)"
            raise ClipkitConfigError(
                f"loss={loss_name} reads the text role(s) {', '.join(unknown_roles)}, which data.texts does not "
                f"define ({have}); add them to data.texts or change the loss's terms")
        if self.text_roles:
            raise ClipkitConfigError(
                f"loss={loss_name} needs {', '.join(missing)}, which a batch with the text roles {roles} "
                f"(data.texts) does not give; use loss=multi_text|multi_text_sigmoid, whose terms name the "
                f"roles, or data.texts=null")
        what = ", ".join(output_info(name).what for name in missing)
        use = " or ".join(sorted({output_info(name).given_by for name in missing}))
        raise ClipkitConfigError(f"loss={loss_name} needs {what} that model={model_name} cannot give; use {use}")

    def on_step(self, step: int) -> None:
        """Called by the Trainer before step `step`'s forward, on every rank."""
        if self.tail_drop_max:
            # Seeded by the step alone: every rank drops the same k, and a resumed run repeats it.
            self.drop_last = random.Random(self.seed * 1_000_003 + step).randint(0, self.tail_drop_max)
        if self.unmasked_tuning_from_step is not None and step >= self.unmasked_tuning_from_step:
            dropout = getattr(self.model.visual, "patch_dropout", None)
            if dropout is not None and hasattr(dropout, "prob"):
                dropout.prob = 0.0  # FLIP's unmasked tuning: full token sequences from here on

    def _tower_dtype(self) -> torch.dtype:
        # DeepSpeed casts the module for bf16 but not the inputs.
        return next(self.model.parameters()).dtype

    def _drop(self) -> int:
        return self.drop_last if self.training else 0  # TailDrop is off in eval

    def encode_image(self, images: torch.Tensor, head: str = SEMANTIC) -> torch.Tensor:
        """[b,3,H,W] -> [b,D] float32, L2-normalized (the loss math always runs in fp32), by image
        head `head` (`model.heads`; the semantic head is the tower's own)."""
        if head != SEMANTIC:
            return self.encode_image_heads(images, (head,))[head]
        images = images.to(self._tower_dtype())
        if self._drop() and is_vision_transformer(self.model.visual):
            pooled, _ = encode_image_parts(self.model.visual, images, self._drop())
        else:
            pooled = self.model.encode_image(images)
        return F.normalize(_loss_precision(pooled), dim=-1)

    def encode_image_heads(self, images: torch.Tensor, heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """[b,3,H,W] -> {head: [b,D] float32, L2-normalized}: the trunk runs once (TailDrop and FLIP's
        patch dropout act on it, so every head sees the same tokens) and each head pools its output."""
        if tuple(heads) == (SEMANTIC,):
            return {SEMANTIC: self.encode_image(images)}
        visual = self.model.visual
        x = tail_drop(visual.transformer(visual._embeds(images.to(self._tower_dtype()))), self._drop())
        out = {}
        for head in heads:
            if head == SEMANTIC:
                pooled = visual._pool(x)[0] @ visual.proj
            else:
                pooled = self.model.heads[head](x)
            out[head] = F.normalize(_loss_precision(pooled), dim=-1)
        return out

    def _text_projection(self, head: str):
        """The text projection that head `head` scores texts with; None: the model's own."""
        if head == SEMANTIC:
            return None
        return self.model.heads[head].text_projection

    def encode_text(self, tokens: torch.Tensor, head: str = SEMANTIC) -> torch.Tensor:
        """[b,L] long -> [b,D] float32, L2-normalized, in the space of image head `head`. A causal CLIP
        text tower runs only up to the batch's last real token (`encode_text_pooled`: exact, and most
        positions are pads)."""
        return self.encode_text_heads(tokens, (head,))[head]

    def encode_text_heads(self, tokens: torch.Tensor, heads: tuple[str, ...]) -> dict[str, torch.Tensor]:
        """[b,L] long -> {head: [b,D] float32, L2-normalized}: one text tower pass, then each head's
        text projection (its own, or the model's shared one)."""
        if all(self._text_projection(head) is None for head in heads):
            shared = F.normalize(_loss_precision(encode_text_pooled(self.model, tokens, self.pad_id)), dim=-1)
            return {head: shared for head in heads}
        pooled = text_pooled_unprojected(self.model, tokens, self.pad_id)
        out = {}
        for head in heads:
            projection = self._text_projection(head)
            projection = self.model.text_projection if projection is None else projection
            out[head] = F.normalize(_loss_precision(project_text(projection, pooled)), dim=-1)
        return out

    def encode_image_tokens(self, images: torch.Tensor) -> torch.Tensor:
        """[b,3,H,W] -> [b,N,D] float32 patch-token features, each L2-normalized."""
        tokens = image_token_features(self.model.visual, images.to(self._tower_dtype()), self._drop())
        return F.normalize(tokens.float(), dim=-1)

    def encode_text_tokens(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[b,L] long -> ([b,L,D] float32 per-token features, L2-normalized; [b,L] bool mask)."""
        features, mask = text_token_features(self.model, tokens, self.pad_id)
        return F.normalize(features.float(), dim=-1), mask

    def encode_texts(self, tokens: torch.Tensor, heads: tuple[str, ...] = (SEMANTIC,)) -> dict[str, torch.Tensor]:
        """[b,K,L] long -> {head: [b,K,D] float32, L2-normalized}: the K texts of each sample in one
        tower call, projected for each head in `heads`."""
        b, k, length = tokens.shape
        flat = self.encode_text_heads(tokens.reshape(b * k, length), heads)
        return {head: features.reshape(b, k, -1) for head, features in flat.items()}

    @staticmethod
    def _heads_of(needs: tuple[str, ...], base: str) -> tuple[str, ...]:
        """The heads whose version of output `base` `needs` names, in a fixed order."""
        return tuple(sorted({split_head(name)[1] for name in needs if split_head(name)[0] == base},
                            key=lambda head: (head != SEMANTIC, head)))

    def outputs(self, batch: Mapping[str, torch.Tensor], needs: tuple[str, ...]) -> dict:
        """The named model outputs in `needs` (see OUTPUTS and `role_outputs`) for one batch."""
        images = batch["image"]
        tokens = batch.get("text")
        out: dict = {}
        if "caption_logits" in needs:
            pooled, image_embs = encode_image_parts(self.model.visual, images.to(self._tower_dtype()), self._drop())
            coca = self.model(images, tokens, image_latent=F.normalize(pooled, dim=-1), image_embs=image_embs)
            out.update(image=coca["image_features"].float(), text=coca["text_features"].float(),
                       caption_logits=coca["logits"], caption_labels=coca["labels"])
        if "image_tokens" in needs:
            out.update(image_tokens=self.encode_image_tokens(images), image_mask=None)
        if "text_tokens" in needs:
            out["text_tokens"], out["text_mask"] = self.encode_text_tokens(tokens)
        # Every head's pooled features from one trunk pass and one text tower pass.
        image_heads, text_heads = self._heads_of(needs, "image"), self._heads_of(needs, "text")
        if image_heads and image_heads != (SEMANTIC,) and "image" not in out:
            for head, features in self.encode_image_heads(images, image_heads).items():
                out[head_output("image", head)] = features
        if text_heads and text_heads != (SEMANTIC,) and "text" not in out:
            for head, features in self.encode_text_heads(tokens, text_heads).items():
                out[head_output("text", head)] = features
        if "image" in needs and "image" not in out:
            out["image"] = self.encode_image(images)
        if "text" in needs and "text" not in out:
            out["text"] = self.encode_text(tokens)
        if "teacher_image" in needs:
            out["teacher_image"], out["teacher_text"], out["teacher_logit_scale"] = \
                self._teacher.features(images, tokens)
        for name in self.role_features():
            heads = self._heads_of(needs, name)
            if heads:
                for head, features in self.encode_texts(batch[name], heads).items():
                    out[head_output(name, head)] = features
            if f"{name}_valid" in needs:
                out[f"{name}_valid"] = batch[f"{name}_valid"].bool()
        return {name: out[name] for name in needs}

    def forward(self, batch: Mapping[str, torch.Tensor], outputs_only: bool = False):
        """-> (loss, metrics); with `outputs_only`, the loss's inputs instead (`outputs(..., loss.needs)`),
        which exact gradient accumulation (`clipkit.accumulation`) forwards through the engine."""
        outputs = self.outputs(batch, tuple(self.loss.needs))
        return outputs if outputs_only else self.loss(**outputs)
