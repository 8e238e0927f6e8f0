"""Shard URLs, the training stream and loader, eval-set reading, and shard writing."""

from clipkit.data.decode import ImageDecoder
from clipkit.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, write_digits_shards
from clipkit.data.digits_captions import write_digits_caption_shards
from clipkit.data.eval_reader import EvalBatch, iter_eval_batches, read_set_metadata
from clipkit.data.loader import TrainLoader, build_sources, build_train_loader
from clipkit.data.stream import ShardStream, StreamPosition, StreamSettings
from clipkit.data.tar_reader import SKIP_REASONS, ShardReader
from clipkit.data.texts import TextRole, roles_from_config
from clipkit.data.urls import Source, expand_sources, expand_urls
from clipkit.data.writer import Row, rows_from_folder, rows_from_table, write_eval_metadata, write_rows, write_shards

__all__ = [
    "DIGIT_CLASSNAMES", "DIGIT_TEMPLATES", "EvalBatch", "ImageDecoder", "SKIP_REASONS", "ShardReader", "ShardStream",
    "Source", "StreamPosition", "StreamSettings", "TrainLoader", "build_sources", "build_train_loader",
    "expand_sources", "expand_urls", "iter_eval_batches", "read_set_metadata", "Row", "rows_from_folder",
    "rows_from_table", "write_digits_shards", "write_eval_metadata", "write_rows", "write_shards",
    "TextRole", "roles_from_config", "write_digits_caption_shards",
]
