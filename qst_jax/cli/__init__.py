"""The command-line tools: qst-train, qst-generate, qst-eval, qst-serve, qst-quantize (pyproject.toml's scripts)."""
