"""Evaluation: zero-shot findings, metrics, retrieval, heat maps."""
from .retrieval import EmbeddingIndex
from .zeroshot import Finding, PromptSet, ZeroShotClassifier, benchmark_names, findings_from_text, load_prompt_set

__all__ = ["EmbeddingIndex", "Finding", "PromptSet", "ZeroShotClassifier", "benchmark_names", "findings_from_text", "load_prompt_set"]
