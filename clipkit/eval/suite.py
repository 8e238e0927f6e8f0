"""Runs the configured eval sets (`eval.sets`) on a model, on every rank, in training or alone.

Each rank embeds its share of every set; the shares are gathered so all ranks compute
the same metrics a 1-process eval would. Rank 0 writes one CLIP_benchmark JSON per
(set, task) into `out_dir`.
"""

from __future__ import annotations

from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator

import torch
from PIL import Image
from torch import nn

from clipkit import distributed
from clipkit.data import EvalBatch, expand_urls, iter_eval_batches, read_set_metadata
from clipkit.errors import ClipkitConfigError
from clipkit.eval import datasets
from clipkit.eval.cache import cache_path, load_embedded, save_embedded
from clipkit.eval.embed import EmbeddedSet, embed_eval_set, gather_embedded_set
from clipkit.eval.runner import (TASKS, SearchConfig, evaluate_embedded, format_results_table,
                                 write_benchmark_json)
from clipkit.eval.zeroshot import zeroshot_classifier

SOURCES = ("urls", *datasets.FILE_SOURCES)


@dataclass
class EvalSetSpec:
    """One eval set. `source` is the key that named it in the config: urls (webdataset
    shards, then `urls` holds the expanded list), csv, jsonl or folder (then `path`)."""

    name: str
    urls: list[str]
    tasks: list[str]
    classnames: list[str] | None
    templates: list[str] | None
    source: str = "urls"
    path: str | None = None
    reader_args: dict[str, str] = field(default_factory=dict)


def _source_of(name: str, s: Any) -> str:
    given = [k for k in SOURCES if s.get(k) is not None]
    if len(given) != 1:
        raise ClipkitConfigError(f"eval.sets.{name}: give exactly one of {', '.join(SOURCES)}; got {given or 'none'}")
    return given[0]


def _file_metadata(source: str, path: str) -> tuple[list[str] | None, list[str] | None]:
    if source == "folder":
        return datasets.folder_classes(path)[1], datasets.folder_templates(path)
    return None, datasets.folder_templates(str(Path(path).parent))


def build_eval_specs(sets_cfg: Any) -> list[EvalSetSpec]:
    """`eval.sets` ({name: {urls|csv|jsonl|folder, tasks, classnames, templates, ...}}) -> checked specs."""
    specs = []
    for name, s in (sets_cfg or {}).items():
        source = _source_of(name, s)
        urls = expand_urls(s["urls"]) if source == "urls" else []
        path = None if source == "urls" else str(s[source])
        default_tasks = ["zeroshot_classification"] if source == "folder" else \
            ["retrieval"] if source in ("csv", "jsonl") else TASKS
        tasks = list(s.get("tasks") or default_tasks)
        unknown = sorted(set(tasks) - set(TASKS))
        if unknown:
            raise ClipkitConfigError(f"eval.sets.{name}.tasks: unknown {unknown}; choose from {list(TASKS)}")
        classnames, templates = s.get("classnames"), s.get("templates")
        reader_args = {k: str(s[k]) for k in ("image_key", "caption_key", "image_root") if s.get(k) is not None}
        if "zeroshot_classification" in tasks and (classnames is None or templates is None):
            found_names, found_templates = read_set_metadata(urls[0]) if urls else _file_metadata(source, path)
            classnames = list(classnames) if classnames is not None else found_names
            templates = list(templates) if templates is not None else found_templates
            if not classnames or not templates:
                raise ClipkitConfigError(
                    f"eval.sets.{name}: zero-shot needs class names and templates; set "
                    f"eval.sets.{name}.classnames/templates or put classnames.txt and "
                    f"zeroshot_classification_templates.txt beside the shards")
        specs.append(EvalSetSpec(name, urls, tasks, classnames and list(classnames),
                                 templates and list(templates), source, path, reader_args))
    return specs


def build_search_config(eval_cfg: Any) -> SearchConfig:
    """`eval.search` -> SearchConfig, for `clipkit-eval` and training-time evals alike.

    A config without `search` (written before it existed) gets exact search.
    """
    search = dict(eval_cfg.get("search") or {})
    unknown = sorted(set(search) - {f.name for f in fields(SearchConfig)})
    if unknown:
        raise ClipkitConfigError(f"eval.search: unknown key(s) {unknown}; "
                                 f"known: {[f.name for f in fields(SearchConfig)]}")
    return SearchConfig(**search)


class EvalSuite:
    """`run(objective, ...)` -> flat metrics `{set/metric: value}`; collective over all ranks."""

    def __init__(self, specs: list[EvalSetSpec], *, preprocess: Callable, tokenizer: Callable,
                 batch_size: int, out_dir: Path | None, model_name: str, pretrained: str = "clipkit",
                 search: SearchConfig | None = None, cache_dir: str | Path | None = None):
        self.specs = specs
        self.search = search or SearchConfig()
        self.cache_dir = cache_dir
        self.preprocess = preprocess
        self.tokenizer = tokenizer
        self.batch_size = batch_size
        self.out_dir = out_dir
        self.model_name = model_name
        self.pretrained = pretrained
        self.last_results: dict[str, dict[str, dict[str, float]]] = {}

    def _encoders(self, objective: nn.Module, device: torch.device):
        def encode_image(images: torch.Tensor) -> torch.Tensor:
            return objective.encode_image(images.to(device))

        def encode_text(texts: list[str]) -> torch.Tensor:
            return torch.cat([objective.encode_text(self.tokenizer(texts[i:i + self.batch_size]).to(device))
                              for i in range(0, len(texts), self.batch_size)])
        return encode_image, encode_text

    def _batches(self, spec: EvalSetSpec, encode_image, encode_text, device) -> Iterator[EvalBatch]:
        local = self._local_batches(spec)
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
            return iter_eval_batches(spec.urls, **share)
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

    def run(self, objective: nn.Module, *, device: torch.device | str, step: int | None = None,
            tag: str | None = None) -> dict[str, float]:
        """Scores every set; `tag` (or "step_<step>") names the checkpoint in the embedding cache key."""
        device = torch.device(device)
        tag = tag if tag is not None else (f"step_{step}" if step is not None else None)
        encode_image, encode_text = self._encoders(objective, device)
        results: dict[str, dict[str, dict[str, float]]] = {}
        for spec in self.specs:
            with torch.no_grad():
                classifier = (zeroshot_classifier(encode_text, spec.classnames, spec.templates)
                              if "zeroshot_classification" in spec.tasks else None)
            emb = self._embedded(spec, encode_image, encode_text, device, tag)
            results[spec.name] = evaluate_embedded(emb, tasks=spec.tasks, classifier=classifier, search=self.search)
        self.last_results = results
        if distributed.rank() == 0 and self.out_dir is not None:
            for set_name, tasks in results.items():
                for task, metrics in tasks.items():
                    write_benchmark_json(self.out_dir / f"{set_name}_{task}.json", dataset=set_name,
                                         model=self.model_name, pretrained=self.pretrained, task=task,
                                         metrics=metrics)
        return {f"{s}/{m}": v for s, tasks in results.items() for metrics in tasks.values() for m, v in metrics.items()}

    def results_table(self) -> str:
        return format_results_table(self.last_results)
