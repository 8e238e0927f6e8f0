"""Runs the configured eval sets (`eval.sets`) on a model, on every rank, in training or alone.

Each rank embeds its share of every set; the shares are gathered so all ranks compute
the same metrics a 1-process eval would. Rank 0 writes one CLIP_benchmark JSON per
(set, task) into `out_dir`.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from clipkit import distributed
from clipkit.data import EvalBatch, expand_urls, iter_eval_batches, read_set_metadata
from clipkit.data.eval_reader import EvalTexts, clip_benchmark_set
from clipkit.errors import ClipkitConfigError
from clipkit.eval import datasets
from clipkit.eval.cache import cache_path, load_array, load_embedded, save_array, save_embedded
from clipkit.eval.captioning import evaluate_captioning
from clipkit.eval.embed import EmbeddedSet, TokenEmbeddings, embed_eval_set, gather_embedded_set
from clipkit.eval.late_interaction import late_interaction_metrics
from clipkit.eval.metrics import linear_cka
from clipkit.eval.runner import (
    BENCHMARK_TASK_NAMES,
    TASKS,
    SearchConfig,
    evaluate_embedded,
    format_results_table,
    write_benchmark_json,
)
from clipkit.eval.scoring import LateInteraction, PooledCosine, Scorer
from clipkit.eval.text_context import check_text_context, model_text_positions, set_tokenizer
from clipkit.eval.zeroshot import classifier_key, zeroshot_classifier
from clipkit.models.heads import SEMANTIC, head_output
from clipkit.schema import EvalSetConfig, load_section

# clip_benchmark: a directory in CLIP_benchmark's webdataset layout (its --dataset_root), read as urls.
SOURCES = ("urls", "clip_benchmark", *datasets.FILE_SOURCES)
# "captioning" (CoCa models: caption CE, BLEU-4, CIDEr) is opt-in per set, never a default.
SET_TASKS = (*TASKS, "captioning")
# Tasks a set runs when it names none, by what it is (a CLIP_benchmark root's dataset_type.txt).
DEFAULT_TASKS = {"classification": ["zeroshot_classification"], "retrieval": ["retrieval"],
                 "selection": ["selection"], "urls": ["zeroshot_classification", "retrieval"]}


# Texts per text-tower call for the zero-shot head (a prompt batch holds no images). On a quiet
# 2-core CPU, 1,000 ImageNet classes x 80 templates took 8.5 s with the tiny tower at 256 and 9.6 s
# at 1,024; ViT-B-32's 20 classes 7.1 s and 9.5 s (larger activations fall out of cache); 128 was
# no faster than 256. An earlier 1,024 came from a machine shared with other jobs.
ZEROSHOT_TEXT_BATCH = 256
# A set's caption level and the image head (`model.heads`) that scores it first when the model has it.
CAPTION_LEVELS = ("short", "long")
LEVEL_HEAD = {"short": SEMANTIC, "long": "perceptual"}
# The parts of one set's eval time (`EvalSuite.last_timings`), in the order they are reported.
TIME_PARTS = ("decode", "image_tower", "text_tower", "search_and_ranks")
TIME_PART_NAMES = {"decode": "decode", "image_tower": "image tower", "text_tower": "text tower",
                   "search_and_ranks": "search and ranks"}


class Stopwatch:
    """Seconds per part of one set's eval, summed over calls. On CUDA a part ends with a device
    sync, so kernels launched in it are charged to it, not to whatever waits next."""

    def __init__(self, device: torch.device):
        self.seconds = dict.fromkeys(TIME_PARTS, 0.0)
        self._sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def timed(self, part: str, fn: Callable) -> Callable:
        def run(*args, **kwargs):
            start = time.perf_counter()
            out = fn(*args, **kwargs)
            self._sync()
            self.seconds[part] += time.perf_counter() - start
            return out
        return run

    def timed_iter(self, part: str, items: Iterator) -> Iterator:
        """`items`, with the time spent producing each (reading, decoding, preprocessing) charged to `part`."""
        it = iter(items)
        while True:
            start = time.perf_counter()
            try:
                item = next(it)
            except StopIteration:
                self.seconds[part] += time.perf_counter() - start
                return
            self.seconds[part] += time.perf_counter() - start
            yield item


@dataclass
class EvalSetSpec:
    """One eval set. `source` is how it is read: urls (webdataset shards, given as `urls` or
    as a `clip_benchmark` root; `urls` holds the expanded list), csv, jsonl or folder (`path`)."""

    name: str
    urls: list[str]
    tasks: list[str]
    classnames: list[str] | None
    templates: list[str] | None
    source: str = "urls"
    path: str | None = None
    reader_args: dict[str, str] = field(default_factory=dict)
    caption_beams: int = 1  # captioning task: 1 = greedy decoding, > 1 = beam search of that width
    texts: EvalTexts = field(default_factory=EvalTexts)  # shards: caption (and selection negatives) sources
    context_length: int | None = None   # tokens per caption; None: the tokenizer's (the model's) own
    captions: str = "short"             # the caption level: short or long (picks the first head)
    heads: list[str] | None = None      # image heads that score it; None: all of the model's


def _source_of(name: str, s: EvalSetConfig) -> str:
    given = [k for k in SOURCES if getattr(s, k) is not None]
    if len(given) != 1:
        hint = (f" (keys for a set that is not there, e.g. an experiment's under eval=none: drop them with "
                f"~eval.sets.{name}, or put them in an eval option under conf/eval/)") if not given else ""
        raise ClipkitConfigError(f"eval.sets.{name}: give exactly one of {', '.join(SOURCES)}; got "
                                 f"{given or 'none'}{hint}")
    return given[0]


def _file_metadata(source: str, path: str) -> tuple[list[str] | None, list[str] | None]:
    if source == "folder":
        return datasets.folder_classes(path)[1], datasets.folder_templates(path)
    return None, datasets.folder_templates(str(Path(path).parent))


def build_eval_specs(sets_cfg: Any) -> list[EvalSetSpec]:
    """`eval.sets` ({name: {urls|clip_benchmark|csv|jsonl|folder, tasks, classnames, templates, ...}}) -> checked specs.

    Each set's keys are `clipkit.schema.EvalSetConfig`'s. `clip_benchmark: <root>` (with `split`,
    default test) reads a set in CLIP_benchmark's webdataset layout: shards from
    `<root>/<split>/nshards.txt`, default task from `<root>/dataset_type.txt`, class names and
    templates from `<root>`.
    """
    specs = []
    for name in (sets_cfg or {}):
        s = load_section(EvalSetConfig, sets_cfg[name], f"eval.sets.{name}")
        source = _source_of(name, s)
        urls, path, dataset_type = [], None, None
        if source == "urls":
            urls = expand_urls(s.urls)
        elif source == "clip_benchmark":
            try:
                urls, dataset_type = clip_benchmark_set(s.clip_benchmark, s.split)
            except ClipkitConfigError as err:
                raise ClipkitConfigError(f"eval.sets.{name}.clip_benchmark: {err}; write the set there (the demo's: "
                                         f"clipkit-shards digits <data_dir>/digits), point the key elsewhere, or "
                                         f"run without evals: eval=none") from None
            source = "urls"
        else:
            path = str(getattr(s, source))
        kind = "classification" if source == "folder" else "retrieval" if source in ("csv", "jsonl") else \
            dataset_type or "urls"
        tasks = list(s.tasks or DEFAULT_TASKS.get(kind, DEFAULT_TASKS["urls"]))
        unknown = sorted(set(tasks) - set(SET_TASKS))
        if unknown:
            raise ClipkitConfigError(f"eval.sets.{name}.tasks: unknown {unknown}; choose from {list(SET_TASKS)}")
        texts = _texts_of(name, s, source, tasks)
        if s.context_length is not None and s.context_length < 2:
            raise ClipkitConfigError(f"eval.sets.{name}.context_length must be >= 2 or null, got {s.context_length}")
        classnames, templates = s.classnames, s.templates
        reader_args = {k: str(getattr(s, k)) for k in ("image_key", "caption_key", "image_root")
                       if getattr(s, k) is not None}
        if "zeroshot_classification" in tasks and (classnames is None or templates is None):
            found_names, found_templates = read_set_metadata(urls[0]) if urls else _file_metadata(source, path)
            classnames = list(classnames) if classnames is not None else found_names
            templates = list(templates) if templates is not None else found_templates
            if not classnames or not templates:
                raise ClipkitConfigError(
                    f"eval.sets.{name}: zero-shot needs class names and templates; set "
                    f"eval.sets.{name}.classnames/templates or put classnames.txt and "
                    f"zeroshot_classification_templates.txt beside the shards")
        beams = s.caption_beams
        if beams < 1:
            raise ClipkitConfigError(f"eval.sets.{name}.caption_beams must be >= 1, got {beams}")
        if s.captions not in CAPTION_LEVELS:
            raise ClipkitConfigError(f"eval.sets.{name}.captions={s.captions!r} is not one of "
                                     f"{', '.join(CAPTION_LEVELS)}")
        heads = None if s.heads is None else list(s.heads)
        if heads is not None and (not heads or len(set(heads)) != len(heads)):
            raise ClipkitConfigError(f"eval.sets.{name}.heads must list distinct image heads (or be null), got {heads}")
        specs.append(EvalSetSpec(name, urls, tasks, classnames and list(classnames),
                                 templates and list(templates), source, path, reader_args, beams,
                                 texts, s.context_length, s.captions, heads))
    return specs


def _texts_of(name: str, s: EvalSetConfig, source: str, tasks: list[str]) -> EvalTexts:
    """The set's caption (and, for the selection task, negatives) sources, checked against its reader."""
    if source != "urls":
        if "selection" in tasks:
            raise ClipkitConfigError(f"eval.sets.{name}: the selection task reads webdataset shards (urls or "
                                     f"clip_benchmark), not {source}")
        if s.caption_source != "txt":
            raise ClipkitConfigError(f"eval.sets.{name}.caption_source applies to shards; a {source} set names its "
                                     "caption column with caption_key")
        return EvalTexts()
    try:
        return EvalTexts(s.caption_source, s.negatives_source if "selection" in tasks else None)
    except ClipkitConfigError as err:
        raise ClipkitConfigError(f"eval.sets.{name}.{err}") from None


def check_captioning(specs: list[EvalSetSpec], model: nn.Module, *, zero_stage: int = 0, world_size: int = 1) -> None:
    """Refuses a `captioning` task the run cannot do, before any training step.

    It needs a CoCa model (its caption decoder). Under ZeRO-3 with several ranks every forward
    gathers the partitioned weights collectively, but greedy decoding stops early per batch and
    ranks hold different numbers of batches, so the ranks' forwards would not pair up and the
    gathers would hang.
    """
    names = [spec.name for spec in specs if "captioning" in spec.tasks]
    if not names:
        return
    if not hasattr(model, "text_decoder"):
        raise ClipkitConfigError(f"eval.sets.{names[0]}.tasks has captioning, which needs a CoCa model "
                                 f"(model=tiny_coca); drop the task for {type(model).__name__}")
    if zero_stage == 3 and world_size > 1:
        raise ClipkitConfigError(f"eval.sets.{names[0]}.tasks has captioning, which cannot run under ZeRO-3 on "
                                 f"{world_size} ranks (decoding steps differ per rank); use trainer.zero_stage<=2 "
                                 "or score the export with clipkit-eval")


def model_heads(objective: Any) -> tuple[str, ...]:
    """The image heads an objective (or `clipkit.evaluate`'s per-head exports) can score with."""
    heads = getattr(objective, "heads", None)
    return tuple(heads()) if callable(heads) else (SEMANTIC,)


def set_heads(spec: EvalSetSpec, heads: tuple[str, ...]) -> list[str]:
    """The heads that score `spec`, the first one reported as the set itself: the set's `heads`, or
    every head of the model with its caption level's head (`LEVEL_HEAD`) first when the model has it."""
    if spec.heads is not None:
        return list(spec.heads)
    first = LEVEL_HEAD[spec.captions] if LEVEL_HEAD[spec.captions] in heads else SEMANTIC
    return [first, *(head for head in heads if head != first)]


def _head_tag(tag: str | None, head: str) -> str | None:
    """The embedding-cache tag of a checkpoint as scored by `head` (`head_output`'s naming)."""
    return None if tag is None else head_output(tag, head)


def check_heads(specs: list[EvalSetSpec], heads: tuple[str, ...]) -> None:
    """Refuses, in one line and before anything runs, a set that names a head the model lacks."""
    for spec in specs:
        missing = [head for head in spec.heads or () if head not in heads]
        if missing:
            raise ClipkitConfigError(f"eval.sets.{spec.name}.heads names {', '.join(missing)}, which the model does "
                                     f"not have (its heads: {', '.join(heads)}; model.heads adds more)")


def build_search_config(eval_cfg: Any) -> SearchConfig:
    """`eval.search` and `eval.tie_tolerance` -> SearchConfig, for `clipkit-eval` and training-time evals alike.

    A config without `search` (written before it existed) gets exact search.
    """
    search = dict(eval_cfg.get("search") or {})
    if eval_cfg.get("tie_tolerance") is not None:
        search["tie_tolerance"] = float(eval_cfg.tie_tolerance)
    unknown = sorted(set(search) - {f.name for f in fields(SearchConfig)})
    if unknown:
        raise ClipkitConfigError(f"eval.search: unknown key(s) {unknown}; "
                                 f"known: {[f.name for f in fields(SearchConfig)]}")
    return SearchConfig(**search)


class EvalSuite:
    """`run(objective, ...)` -> flat metrics `{set/metric: value}`; collective over all ranks."""

    def __init__(self, specs: list[EvalSetSpec], *, preprocess: Callable, tokenizer: Callable,
                 batch_size: int, out_dir: Path | None, model_name: str, pretrained: str = "clipkit",
                 search: SearchConfig | None = None, cache_dir: str | Path | None = None,
                 scorer: Scorer | None = None):
        """`scorer` (`clipkit.eval.scoring.build_scorer`): pooled cosine by default, or FILIP late interaction."""
        self.specs = specs
        self.scorer = scorer or PooledCosine()
        self.search = search or SearchConfig()
        self.cache_dir = cache_dir
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.model_name = model_name
        self.pretrained = pretrained
        self.last_results: dict[str, dict[str, dict[str, float]]] = {}
        # Per set: seconds of decode, image tower, text tower, search and ranks (TIME_PARTS) of the
        # last run, on this rank; the zero-shot head counts as text tower.
        self.last_timings: dict[str, dict[str, float]] = {}
        self._watch: Stopwatch | None = None

    def _tokenizer(self, spec: EvalSetSpec, objective: nn.Module):
        """The set's tokenizer: at its `context_length` (padded to the model's positions), else the model's."""
        return set_tokenizer(self.tokenizer, spec.context_length, model_text_positions(objective))

    def _encoders(self, objective: nn.Module, device: torch.device, spec: EvalSetSpec, text_batch: int | None = None,
                  heads: tuple[str, ...] = (SEMANTIC,)):
        """(encode_image, encode_text), timed; texts go through the tower `text_batch` (default
        `batch_size`) at a time. Each item is embedded by every image head in `heads` (and its text
        projection), the heads' unit vectors side by side ([n, len(heads)·D]; `_heads_embedded`)."""
        tokenizer = self._tokenizer(spec, objective)
        text_batch = text_batch or self.batch_size

        def packed(by_head: dict[str, torch.Tensor]) -> torch.Tensor:
            return torch.cat([by_head[head] for head in heads], dim=-1)

        if heads == (SEMANTIC,):   # one-head objectives and bare open_clip wrappers are called as always
            def encode_image_batch(images):
                return objective.encode_image(images)

            def encode_text_batch(tokens):
                return objective.encode_text(tokens)
        else:
            def encode_image_batch(images):
                return packed(objective.encode_image_heads(images, heads))

            def encode_text_batch(tokens):
                return packed(objective.encode_text_heads(tokens, heads))

        def encode_image(images: torch.Tensor) -> torch.Tensor:
            return encode_image_batch(images.to(device))

        def encode_text(texts: list[str]) -> torch.Tensor:
            return torch.cat([encode_text_batch(tokenizer(texts[i:i + text_batch]).to(device))
                              for i in range(0, len(texts), text_batch)])
        return self._timed(encode_image, encode_text)

    def _timed(self, encode_image, encode_text):
        if self._watch is None:
            return encode_image, encode_text
        return self._watch.timed("image_tower", encode_image), self._watch.timed("text_tower", encode_text)

    def _batches(self, spec: EvalSetSpec, encode_image, encode_text, device) -> Iterator[EvalBatch]:
        local = self._local_batches(spec)
        if self._watch is not None:
            local = self._watch.timed_iter("decode", local)
        for batch in distributed.in_lockstep(local, device):
            if batch is None:  # this rank is done; match the others' collective forwards
                with torch.no_grad():
                    encode_image(self.preprocess(Image.new("RGB", (8, 8)))[None])
                    encode_text(["a"])
                continue
            yield batch

    def _local_batches(self, spec: EvalSetSpec) -> Iterator[EvalBatch]:
        share = dict(preprocess=self.preprocess, batch_size=self.batch_size, rank=distributed.rank(),
                     world_size=distributed.world_size())
        if spec.source == "urls":
            return iter_eval_batches(spec.urls, **share, texts=spec.texts)
        if spec.source == "folder":
            items = datasets.read_folder_items(spec.path)
        else:
            items = datasets.read_caption_items(spec.path, **spec.reader_args)
        return datasets.iter_item_batches(items, **share)

    def _embedded(self, spec: EvalSetSpec, encode_image, encode_text, device, tag: str | None) -> EmbeddedSet:
        """The gathered set: from the cache when `cache_dir` and `tag` are set and it holds one."""
        path = cache_path(self.cache_dir, self.model_name, spec.name, tag) if self.cache_dir and tag else None
        cached = load_embedded(path) if path is not None else None
        if cached is not None:  # every rank sees the same files, so all skip the collectives alike
            return cached
        with torch.no_grad():
            local = embed_eval_set(self._batches(spec, encode_image, encode_text, device), encode_image, encode_text)
        emb = gather_embedded_set(local, device=device)
        if path is not None and distributed.rank() == 0:
            save_embedded(path, emb)
        return emb

    def _heads_embedded(self, spec: EvalSetSpec, objective: Any, device: torch.device, tag: str | None,
                        heads: list[str]) -> dict[str, EmbeddedSet]:
        """{head: the gathered set as that head and its text projection embed it}. With several
        heads the set is read and embedded once: each item's heads' unit vectors are packed side
        by side ([n, H·D], so the embed, gather and cache path carries them) and split after."""
        encode_image, encode_text = self._encoders(objective, device, spec, heads=tuple(heads))
        packed = self._embedded(spec, encode_image, encode_text, device, _head_tag(tag, "+".join(heads)))
        if len(heads) == 1:
            return {heads[0]: packed}

        def part(x: torch.Tensor, i: int) -> torch.Tensor:
            # embed_eval_set normalized the packed row (each part to 1/sqrt(H)); each head's own is a unit vector.
            width = x.shape[1] // len(heads)
            return torch.nn.functional.normalize(x[:, i * width:(i + 1) * width], dim=-1)
        return {head: EmbeddedSet(part(packed.image_emb, i), part(packed.text_emb, i), packed.text_image_index,
                                  packed.labels) for i, head in enumerate(heads)}

    def _token_encoders(self, objective: nn.Module, device: torch.device, spec: EvalSetSpec):
        """FILIP token features packed into one vector per item (`TokenEmbeddings.pack_*`), so the
        embedding, gather and cache machinery of the pooled path carries them."""
        tokenizer = self._tokenizer(spec, objective)

        def encode_image(images: torch.Tensor) -> torch.Tensor:
            return TokenEmbeddings.pack_images(objective.encode_image_tokens(images.to(device)))

        def encode_text(texts: list[str]) -> torch.Tensor:
            return torch.cat([TokenEmbeddings.pack_texts(*objective.encode_text_tokens(
                tokenizer(texts[i:i + self.batch_size]).to(device)))
                for i in range(0, len(texts), self.batch_size)])
        return self._timed(encode_image, encode_text)

    def _late_interaction(self, spec: EvalSetSpec, objective: nn.Module, device: torch.device,
                          tag: str | None) -> dict[str, dict[str, float]]:
        encode_image, encode_text = self._token_encoders(objective, device, spec)
        tokenizer = self._tokenizer(spec, objective)
        tasks = [t for t in spec.tasks if t != "captioning"]
        class_kwargs = {}
        with torch.no_grad():
            if "zeroshot_classification" in tasks:
                prompts = [t.replace("{c}", c) for c in spec.classnames for t in spec.templates]  # class-major
                class_tokens, class_mask = objective.encode_text_tokens(tokenizer(prompts).to(device))
                class_kwargs = dict(class_tokens=class_tokens.cpu(), class_mask=class_mask.cpu(),
                                    num_classes=len(spec.classnames))
            dim = objective.encode_text_tokens(tokenizer(["a"]).to(device))[0].shape[-1]
        emb = self._embedded(spec, encode_image, encode_text, device, tag and f"{tag}-tokens")
        tokens = TokenEmbeddings.unpack(emb, dim)
        with self._watch_part("search_and_ranks"):
            return late_interaction_metrics(self.scorer.similarity, image_tokens=tokens.image_tokens, tasks=tasks,
                                            labels=tokens.labels, text_tokens=tokens.text_tokens,
                                            text_mask=tokens.text_mask, text_image_index=tokens.text_image_index,
                                            tie_atol=self.search.tie_tolerance, **class_kwargs)

    def run(self, objective: nn.Module, *, device: torch.device | str, step: int | None = None,
            tag: str | None = None) -> dict[str, float]:
        """Scores every set; `tag` (or "step_<step>") names the checkpoint in the embedding cache key.

        The suite's scorer decides pooled cosine or FILIP's token-wise late interaction; a set
        with the `captioning` task also gets caption CE, BLEU-4 and CIDEr. A set whose
        `context_length` exceeds the model's text positions is refused before anything runs.
        """
        device = torch.device(device)
        tag = tag if tag is not None else (f"step_{step}" if step is not None else None)
        check_text_context(self.specs, objective)
        heads = model_heads(objective)
        check_heads(self.specs, heads)
        results: dict[str, dict[str, dict[str, float]]] = {}
        self.last_timings = {}
        for spec in self.specs:
            self._watch = Stopwatch(device)
            tasks = [t for t in spec.tasks if t != "captioning"]
            if isinstance(self.scorer, LateInteraction):
                results[spec.name] = self._late_interaction(spec, objective, device, tag)
            else:
                # With several image heads each scores the whole set; the first is reported as the set.
                # One read of the set and one trunk pass serve every head (`_heads_embedded`).
                scoring = set_heads(spec, heads)
                by_head = self._heads_embedded(spec, objective, device, tag, scoring)
                images = {}
                for i, head in enumerate(scoring):
                    name = spec.name if i == 0 else f"{spec.name}@{head}"
                    # Prompts are short and carry no images: the head runs in larger text batches.
                    head_text = self._encoders(objective, device, spec, ZEROSHOT_TEXT_BATCH, heads=(head,))[1]
                    classifier = (self._classifier(spec, head_text, objective, _head_tag(tag, head))
                                  if "zeroshot_classification" in tasks else None)
                    with self._watch_part("search_and_ranks"):
                        results[name] = evaluate_embedded(by_head[head], tasks=tasks, classifier=classifier,
                                                          search=self.search)
                    images[head] = by_head[head].image_emb
                if len(images) > 1:
                    # How alike the heads' image embeddings are on this set's images (1: the same up to rotation).
                    (first, x), *others = images.items()
                    results[spec.name]["heads"] = {f"linear_cka_{first}_{head}": linear_cka(x, y) for head, y in others}
            if "captioning" in spec.tasks:
                results[spec.name]["captioning"] = self._captioning(spec, objective, device)
            self.last_timings[spec.name] = dict(self._watch.seconds)
            self._watch = None
        self.last_results = results
        if distributed.rank() == 0 and self.out_dir is not None:
            for set_name, tasks in results.items():
                for task, metrics in tasks.items():
                    write_benchmark_json(self.out_dir / f"{set_name}_{task}.json", dataset=set_name,
                                         model=self.model_name, pretrained=self.pretrained,
                                         task=BENCHMARK_TASK_NAMES.get(task, task), metrics=metrics)
        return {f"{s}/{m}": v for s, tasks in results.items() for metrics in tasks.values() for m, v in metrics.items()}

    @contextlib.contextmanager
    def _watch_part(self, part: str) -> Iterator[None]:
        """Charges the time inside to `part` of the current set (nothing outside `run`)."""
        start = time.perf_counter()
        try:
            yield
        finally:
            if self._watch is not None:
                self._watch.seconds[part] += time.perf_counter() - start

    def _classifier(self, spec: EvalSetSpec, encode_text, objective: nn.Module, tag: str | None) -> torch.Tensor:
        """[C, D] zero-shot class embeddings, built once per (checkpoint, set): from the embedding
        cache when `cache_dir` and `tag` are set and it holds them (keyed by the class names,
        templates and context length too), else through the text tower in one batched pass."""
        path = None
        if self.cache_dir and tag:
            key = classifier_key(spec.classnames, spec.templates, str(spec.context_length))
            path = cache_path(self.cache_dir, self.model_name, spec.name, f"{tag}-zeroshot") / f"classifier-{key}.npy"
            cached = load_array(path)
            if cached is not None:
                return cached
        with torch.no_grad():
            classifier = zeroshot_classifier(encode_text, spec.classnames, spec.templates)
        if path is not None and distributed.rank() == 0:
            save_array(path, classifier)
        return classifier

    def _captioning(self, spec: EvalSetSpec, objective: nn.Module, device: torch.device) -> dict:
        model = getattr(objective, "model", objective)
        check_captioning([spec], model)
        metrics, captions = evaluate_captioning(model, self._local_batches(spec), self.tokenizer, device=device,
                                                beams=spec.caption_beams)
        if distributed.rank() == 0 and self.out_dir is not None:
            self.out_dir.mkdir(parents=True, exist_ok=True)
            (self.out_dir / f"{spec.name}_captions.json").write_text(json.dumps(captions, indent=1))
        return metrics

    def results_table(self) -> str:
        return format_results_table(self.last_results)
