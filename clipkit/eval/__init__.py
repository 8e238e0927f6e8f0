"""Zero-shot classification and retrieval evaluation with CLIP_benchmark's metrics."""

from clipkit.eval.embed import EmbeddedSet, embed_eval_set, gather_embedded_set
from clipkit.eval.metrics import classification_metrics, retrieval_metrics
from clipkit.eval.runner import TASKS, evaluate_embedded, format_results_table, write_benchmark_json
from clipkit.eval.search import gpu_faiss_available, topk_inner_product
from clipkit.eval.zeroshot import zeroshot_classifier

__all__ = [
    "TASKS",
    "EmbeddedSet",
    "classification_metrics",
    "embed_eval_set",
    "evaluate_embedded",
    "format_results_table",
    "gather_embedded_set",
    "gpu_faiss_available",
    "retrieval_metrics",
    "topk_inner_product",
    "write_benchmark_json",
    "zeroshot_classifier",
]
