"""Several texts per image: a weighted sum of per-role contrastive terms with one shared temperature.

Selected by `loss=multi_text` (softmax: multi-positive InfoNCE, text→image rows as DreamLIP's
Eq. 5, image→text with all an image's positives as a uniform target) or
`loss=multi_text_sigmoid` (FLAIR's multi-positive sigmoid). `loss.terms` maps a term name to

    {texts: <role>, weight: <float>, negatives: <role> | null, negative_scope: all | own}

where the roles are `data.texts` roles. Each term scores the image features against the role's
[b, K, D] text features (K positives per image, a validity mask), optionally with another
role's texts as hard negatives: for every image (scope "all", NegCLIP) or for their own image
only ("own"). K = 1 with every text valid and no negatives is exactly `loss=clip` /
`loss=siglip`. Examples:

    loss=multi_text 'loss.terms={alt: {texts: alt}, long: {texts: long, weight: 1.0}}'   # DreamLIP
    loss=multi_text_sigmoid 'loss.terms={long: {texts: long}}'                           # FLAIR's MPS
    loss=multi_text 'loss.terms={alt: {texts: alt, negatives: neg, negative_scope: own}}'  # NegCLIP

Every term is exact over the global batch at any world size (`clipkit.losses.fused`); the
chunked kernels never hold a [b, B·K] matrix. There are no Triton kernels for these terms:
`loss.impl=auto` runs the chunked kernels on every device and `loss.impl=triton` is refused.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
from torch import nn

from clipkit.errors import ClipkitConfigError
from clipkit.losses.functional import NEGATIVE_SCOPES
from clipkit.losses.fused import check_impl, multi_positive_clip_loss, multi_positive_siglip_loss, parse_chunk_size
from clipkit.losses.logit_scale import LogitScale

FORMS = ("softmax", "sigmoid")
TERM_KEYS = ("texts", "weight", "negatives", "negative_scope", "image")
# The image head a term scores when it names none: the tower's own pooled projection
# (clipkit.models.heads.SEMANTIC; repeated here so that the loss does not import the models).
SEMANTIC = "semantic"
# Roles whose outputs `text_<role>` would collide with the objective's existing outputs.
RESERVED_ROLES = ("tokens", "mask")


def _role(term: str, key: str, value) -> str:
    if not isinstance(value, str) or not value.isidentifier() or value in RESERVED_ROLES:
        raise ClipkitConfigError(f"loss.terms.{term}.{key} must name a data.texts role (a Python identifier, not "
                                 f"{' or '.join(RESERVED_ROLES)}), got {value!r}")
    return value


def parse_terms(terms) -> dict[str, dict]:
    """`loss.terms` checked and completed: name -> {texts, weight, negatives, negative_scope}.

    Raises a one-line ClipkitConfigError on an empty mapping, an unknown key, a missing `texts`,
    a weight that is not a number, a scope other than all|own, or a role used both as positives
    (some term's `texts`) and as hard negatives (some term's `negatives`).
    """
    if terms is None:
        raise ClipkitConfigError("loss.terms is null and no data.texts role fills it: define data.texts roles, or "
                                 "name the terms, e.g. 'loss.terms={alt: {texts: alt}, long: {texts: long}}'")
    if not isinstance(terms, Mapping) or not terms:
        raise ClipkitConfigError(f"loss.terms must map term names to {{texts: <role>, weight: <float>}}, "
                                 f"got {terms!r}")
    parsed = {}
    for name, spec in terms.items():
        if not isinstance(name, str) or not name.isidentifier():
            raise ClipkitConfigError(f"loss.terms: a term name must be a Python identifier, got {name!r}")
        if not isinstance(spec, Mapping):
            raise ClipkitConfigError(f"loss.terms.{name} must be a mapping {{texts: <role>, weight: <float>}}, "
                                     f"got {spec!r}")
        unknown = sorted(set(spec) - set(TERM_KEYS))
        if unknown:
            raise ClipkitConfigError(f"loss.terms.{name}.{unknown[0]} is not a term key; use {', '.join(TERM_KEYS)}")
        if "texts" not in spec:
            raise ClipkitConfigError(f"loss.terms.{name}.texts is not set: name the data.texts role it scores")
        weight = spec.get("weight", 1.0)
        if isinstance(weight, bool) or not isinstance(weight, (int, float)):
            raise ClipkitConfigError(f"loss.terms.{name}.weight must be a number, got {weight!r}")
        scope = spec.get("negative_scope", "all")
        if scope not in NEGATIVE_SCOPES:
            raise ClipkitConfigError(f"loss.terms.{name}.negative_scope must be all or own, got {scope!r}")
        negatives = spec.get("negatives")
        image = spec.get("image", SEMANTIC)
        if not isinstance(image, str) or not image.isidentifier():
            raise ClipkitConfigError(f"loss.terms.{name}.image must name an image head (semantic or a model.heads "
                                     f"name), got {image!r}")
        parsed[name] = {"texts": _role(name, "texts", spec["texts"]), "weight": float(weight),
                        "negatives": None if negatives is None else _role(name, "negatives", negatives),
                        "negative_scope": scope, "image": image}
    positives = {t["texts"] for t in parsed.values()}
    for name, term in parsed.items():
        if term["negatives"] in positives:
            raise ClipkitConfigError(f"loss.terms.{name}.negatives={term['negatives']!r} is also a term's texts: "
                                     f"a role is either positives or hard negatives")
    return parsed


def _at(name: str, head: str) -> str:
    """Output `name` as scored by image head `head` (`clipkit.models.heads.head_output`)."""
    return name if head == SEMANTIC else f"{name}@{head}"


def needs_of(terms: dict[str, dict]) -> tuple[str, ...]:
    """The model outputs the terms take: each scored head's image features (`image`, `image@<head>`),
    then every role's features in that head's text space (`text_<r>`, `text_<r>@<head>`) and its
    mask `text_<r>_valid`, sorted and without repeats."""
    images, texts, masks = set(), set(), set()
    for t in terms.values():
        images.add(_at("image", t["image"]))
        for role in (t["texts"], t["negatives"]):
            if role is not None:
                texts.add(_at(f"text_{role}", t["image"]))
                masks.add(f"text_{role}_valid")
    first = ["image"] if "image" in images else []
    return (*first, *sorted(images - {"image"}), *sorted(texts | masks))


def term_heads(terms: dict[str, dict]) -> tuple[str, ...]:
    """The image heads the terms score, the semantic head first."""
    return tuple(sorted({t["image"] for t in terms.values()}, key=lambda head: (head != SEMANTIC, head)))


class MultiTextLoss(nn.Module):
    """Σ_term weight · (multi-positive softmax or sigmoid loss of the image against the term's role).

    Args:
        terms: name -> {texts: role, weight: float = 1.0, negatives: role | None = None,
            negative_scope: "all" | "own" = "all"} (see `parse_terms`).
        form: "softmax" (`loss=multi_text`) or "sigmoid" (`loss=multi_text_sigmoid`).
        init_logit_scale, max_logit_scale, learn_logit_scale: the shared `LogitScale` (`temperature`).
        init_logit_bias: the sigmoid's β init (None: −10, SigLIP's); must be None for softmax.
        impl: "auto" | "chunked" | "naive" ("triton" is refused: no such kernels).
        chunk_size: "auto" or rows per chunk of the chunked kernels.

    `needs` (an instance attribute) is built from the terms. forward returns the rank's weighted
    sum (W × its share, like every fused loss) and metrics `logit_scale`, (`logit_bias`) and
    `loss_<term>` per term.
    """

    def __init__(self, terms: dict | None, form: str = "softmax", init_logit_scale: float = 1 / 0.07,
                 init_logit_bias: float | None = None, max_logit_scale: float = 100.0,
                 learn_logit_scale: bool = True, impl: str = "auto", chunk_size: int | str = "auto"):
        super().__init__()
        if form not in FORMS:
            raise ClipkitConfigError(f"loss.form={form!r} is not one of {', '.join(FORMS)}")
        if form == "softmax" and init_logit_bias is not None:
            raise ClipkitConfigError("loss.init_logit_bias is for form=sigmoid (a softmax ignores a bias); set it to null")
        check_impl(impl)
        if impl == "triton":
            raise ClipkitConfigError("loss.impl=triton: there are no Triton kernels for the multi-positive losses; "
                                     "use loss.impl=auto, chunked or naive")
        self.terms = parse_terms(terms)
        self.needs = needs_of(self.terms)
        self.form, self.impl, self.chunk = form, impl, parse_chunk_size(chunk_size)
        bias = (-10.0 if init_logit_bias is None else float(init_logit_bias)) if form == "sigmoid" else None
        heads = term_heads(self.terms)
        # One LogitScale per image head: the semantic head's is `temperature` (the state keys of a
        # one-head loss), every other head's `head_temperatures.<head>`, each with its own cap.
        if SEMANTIC in heads:
            self.temperature = LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale, init_bias=bias)
        extra = [head for head in heads if head != SEMANTIC]
        if extra:
            self.head_temperatures = nn.ModuleDict({
                head: LogitScale(init_logit_scale, max_logit_scale, learn_logit_scale, init_bias=bias)
                for head in extra})

    def head_temperature(self, head: str) -> LogitScale:
        """The LogitScale of image head `head`."""
        return self.temperature if head == SEMANTIC else self.head_temperatures[head]

    def forward(self, **outputs: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """outputs: per scored head h, `image` / `image@h` [b, D] and, per role r, `text_<r>` /
        `text_<r>@h` [b, K_r, D], and `text_<r>_valid` [b, K_r] -> (rank loss, metrics)."""
        metrics, total = {}, None
        temperatures = {head: self.head_temperature(head)() for head in term_heads(self.terms)}
        for head in temperatures:
            suffix = "" if head == SEMANTIC else f"_{head}"
            for key, value in self.head_temperature(head).metrics().items():
                metrics[f"{key}{suffix}"] = value
        for name, term in self.terms.items():
            head = term["image"]
            scale, bias = temperatures[head]
            options = {"impl": self.impl, "chunk": self.chunk, "negative_scope": term["negative_scope"]}
            if term["negatives"] is not None:
                options["negatives"] = outputs[_at(f"text_{term['negatives']}", head)]
                options["negatives_valid"] = outputs[f"text_{term['negatives']}_valid"]
            image, text = outputs[_at("image", head)], outputs[_at(f"text_{term['texts']}", head)]
            valid = outputs[f"text_{term['texts']}_valid"]
            if self.form == "softmax":
                value = multi_positive_clip_loss(image, text, valid, scale, **options)
            else:
                value = multi_positive_siglip_loss(image, text, valid, scale, bias, **options)
            metrics[f"loss_{name}"] = value.detach()
            total = term["weight"] * value if total is None else total + term["weight"] * value
        return total, metrics
