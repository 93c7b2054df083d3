"""Evaluation: host-side metrics and the evaluators the trainer builds from `config.evals`."""

from crucible_jax.eval.evaluators import EVALUATORS, Evaluator, build_evaluators
from crucible_jax.eval.metrics import (ctc_greedy_decode, multilabel_map, retrieval_metrics, vqa_soft_accuracy,
                                       word_error_rate)

__all__ = ["EVALUATORS", "Evaluator", "build_evaluators", "ctc_greedy_decode", "multilabel_map",
           "retrieval_metrics", "vqa_soft_accuracy", "word_error_rate"]
