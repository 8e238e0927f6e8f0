"""Image bytes -> the model's input tensor, decoding JPEGs at reduced scale when that loses nothing.

libjpeg can decode a JPEG at 1/2, 1/4 or 1/8 scale by dropping high DCT coefficients
(PIL's `Image.draft`), which skips most of the inverse DCT and colour conversion work: a
512 px photo decoded at 1/2 scale costs about a third of a full decode. This is only done
when the reduced image still has at least as many pixels as the transform's output in
each dimension, so the final resize remains a downscale and its quality is preserved.

Two transform prefixes are recognised (`data.jpeg_draft=false` turns the fast path off):
  - `RandomResizedCrop` (open_clip's train transform): the crop box is drawn first, from the
    JPEG header's size and the same torch RNG calls torchvision makes, and the scale is the
    largest one that keeps that box at least output-sized;
  - `Resize(int)` then anything (open_clip's val transform): the short side must stay >= size.
Any other transform, and every PNG/WebP, takes the plain path: full decode, then `preprocess`.
"""

from __future__ import annotations

import io
from collections.abc import Callable

import PIL.Image
import torch
from torchvision.transforms import Compose, RandomResizedCrop, Resize
from torchvision.transforms import functional as F

Preprocess = Callable[[PIL.Image.Image], torch.Tensor]
DECODE_ERRORS = (OSError, ValueError, SyntaxError, PIL.Image.DecompressionBombError)
_SCALES = (8, 4, 2, 1)


class _CropThenRest:
    """RandomResizedCrop with the crop drawn before decoding, then the remaining transforms."""

    def __init__(self, crop: RandomResizedCrop, rest: Preprocess):
        self.crop = crop
        self.rest = rest
        self.out_h, self.out_w = crop.size
        self.resample = F.pil_modes_mapping[crop.interpolation]

    def __call__(self, raw: PIL.Image.Image) -> torch.Tensor:
        top, left, height, width = self.crop.get_params(raw, self.crop.scale, self.crop.ratio)
        scale = next(s for s in _SCALES if height // s >= self.out_h and width // s >= self.out_w or s == 1)
        applied = 1.0
        if scale > 1:
            full_width = raw.width
            result = raw.draft("RGB", (raw.width // scale, raw.height // scale))
            if result is not None:
                applied = full_width / result[1][2]
        image = raw.convert("RGB")
        if applied == 1.0:
            # Exactly torchvision's RandomResizedCrop on the full image.
            cropped = F.resized_crop(image, top, left, height, width, list(self.crop.size),
                                     self.crop.interpolation, antialias=self.crop.antialias)
        else:
            box = (left / applied, top / applied, (left + width) / applied, (top + height) / applied)
            cropped = image.resize((self.out_w, self.out_h), self.resample, box=box)
        return self.rest(cropped)


class _ResizeFirst:
    """Resize(size) (shortest side) first: any scale that keeps both sides >= size."""

    def __init__(self, size: int, preprocess: Preprocess):
        self.size = size
        self.preprocess = preprocess

    def __call__(self, raw: PIL.Image.Image) -> torch.Tensor:
        # draft never goes below the requested size in either dimension.
        raw.draft("RGB", (self.size, self.size))
        return self.preprocess(raw.convert("RGB"))


def _jpeg_fast_path(preprocess: Preprocess) -> Callable[[PIL.Image.Image], torch.Tensor] | None:
    if not isinstance(preprocess, Compose) or not preprocess.transforms:
        return None
    first, rest = preprocess.transforms[0], Compose(preprocess.transforms[1:])
    if isinstance(first, RandomResizedCrop):
        return _CropThenRest(first, rest)
    if isinstance(first, Resize) and first.max_size is None:
        size = first.size if isinstance(first.size, int) else (first.size[0] if len(first.size) == 1 else None)
        if size is not None:
            return _ResizeFirst(size, preprocess)
    return None


class ImageDecoder:
    """`bytes -> [3, H, W] float32`, as `preprocess(PIL.Image.open(bytes).convert("RGB"))` would give.

    Raises one of `DECODE_ERRORS` for bytes that are not a readable image.
    """

    def __init__(self, preprocess: Preprocess, jpeg_draft: bool = True):
        self.preprocess = preprocess
        self.fast = _jpeg_fast_path(preprocess) if jpeg_draft else None

    def __call__(self, data: bytes) -> torch.Tensor:
        with PIL.Image.open(io.BytesIO(data)) as raw:
            if self.fast is not None and raw.format == "JPEG":
                return self.fast(raw)
            image = raw.convert("RGB")
        return self.preprocess(image)
