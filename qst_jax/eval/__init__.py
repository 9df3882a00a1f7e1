"""Held-out evaluation: perplexity, GLUE-style classification, MMLU-style multiple choice."""
