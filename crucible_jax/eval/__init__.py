"""Evaluation: host-side metrics and the generic evaluators (tasks register them; `tasks.build_evaluators`)."""

from crucible_jax.eval.evaluators import Evaluator
from crucible_jax.eval.metrics import (ctc_greedy_decode, multilabel_map, retrieval_metrics, vqa_soft_accuracy,
                                       word_error_rate)

__all__ = ["Evaluator", "ctc_greedy_decode", "multilabel_map", "retrieval_metrics", "vqa_soft_accuracy",
           "word_error_rate"]
