"""Evaluation: the paper's metrics, an offline harmfulness judge, text metrics.

Heavy parts (MiniLM, judges, generation) load lazily on first use.
"""
from .evaluator import EvalConfig, Evaluator
from .refusal import is_refusal, refusal_rate
from .text_metrics import bleu, degenerate_rate, degeneration, distinct_n, rouge_l

__all__ = ["EvalConfig", "Evaluator", "bleu", "degenerate_rate", "degeneration", "distinct_n",
           "is_refusal", "refusal_rate", "rouge_l"]
