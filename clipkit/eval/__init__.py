"""Zero-shot classification and retrieval evaluation with CLIP_benchmark's metrics."""

from clipkit.eval.embed import EmbeddedSet, embed_eval_set, gather_embedded_set
from clipkit.eval.metrics import (
                                  TIE_ATOL,
                                  classification_metrics,
                                  exact_ranks,
                                  positive_ranks,
                                  retrieval_metrics,
                                  retrieval_metrics_exact,
)
from clipkit.eval.runner import (
                                  TASKS,
                                  SearchConfig,
                                  evaluate_embedded,
                                  format_results_table,
                                  write_benchmark_json,
                                  write_summary,
)
from clipkit.eval.search import APPROX_INDEXES, build_index, gpu_faiss_available, recall_vs_exact, topk_inner_product
from clipkit.eval.zeroshot import zeroshot_classifier

__all__ = [
    "APPROX_INDEXES",
    "SearchConfig",
    "TIE_ATOL",
    "build_index",
    "exact_ranks",
    "positive_ranks",
    "recall_vs_exact",
    "retrieval_metrics_exact",
    "write_summary",
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
