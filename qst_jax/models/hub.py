"""Models named on the Hugging Face Hub: `org/name` (a safetensors repo) or `org/name:file.gguf`, made local.

    resolve_model("meta-llama/Llama-2-7b-hf")                 -> the snapshot folder in the Hub cache
    resolve_model("org/name", revision="a1b2c3...")            -> that revision's snapshot
    resolve_model("bartowski/SmolLM2-135M-GGUF:SmolLM2-135M-Q8_0.gguf")  -> that one file

A path that exists locally always wins. The download is `qst_jax.hub`'s
(huggingface_hub, its cache, token, endpoint and offline mode): the config,
tokenizer files, `*.safetensors` and their index; a GGUF repo's one named
file. Every failure is one `HubError` line naming the repo and what to do.
"""

from __future__ import annotations

import os

from qst_jax.hub import HubError, download, is_repo_id

__all__ = ["MODEL_FILES", "HubError", "is_hub_id", "resolve_model"]

# What a model repo's snapshot needs: config, tokenizer, weights (sharded ones through their index).
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja",
               "chat_template.json"]


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hub repo (`org/name`, optionally `:file.gguf`) rather than a local path."""
    return is_repo_id(path.split(":", 1)[0]) and not os.path.exists(os.path.expanduser(path)) and \
        not path.startswith((".", "/", "~"))


def resolve_model(path: str, revision: str | None = None, *, config_only: bool = False) -> str:
    """A local path for `path`: itself when it exists, else the Hub snapshot (or GGUF file) it names.

    Args:
      path: a local directory or file, or `org/name` / `org/name:file.gguf`.
      revision: a branch, tag or commit of the Hub repo (None: its default branch).
      config_only: fetch `config.json` alone (what `qst-train --plan` reads) into the snapshot folder.

    Raises:
      HubError: a missing, private or gated repo, a missing revision or file,
        no network, or offline mode without the files cached.
    """
    if not is_hub_id(path):
        return path
    repo, _, filename = path.partition(":")
    if filename:
        return download(repo, revision=revision, filename=filename, field="model.path")
    if config_only:
        return os.path.dirname(download(repo, revision=revision, filename="config.json", field="model.path"))
    return download(repo, revision=revision, allow_patterns=MODEL_FILES, field="model.path")
