"""Shard URLs, the training stream, eval-set reading, and shard writing."""

from clipkit.data.digits import DIGIT_CLASSNAMES, DIGIT_TEMPLATES, write_digits_shards
from clipkit.data.eval_reader import EvalBatch, iter_eval_batches, read_set_metadata
from clipkit.data.stream import ShardStream, build_train_loader
from clipkit.data.urls import expand_urls
from clipkit.data.writer import samples_from_csv, samples_from_folder, write_shards

__all__ = [
    "DIGIT_CLASSNAMES", "DIGIT_TEMPLATES", "EvalBatch", "ShardStream", "build_train_loader", "expand_urls",
    "iter_eval_batches", "read_set_metadata", "samples_from_csv", "samples_from_folder", "write_digits_shards",
    "write_shards",
]
