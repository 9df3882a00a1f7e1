"""Models named on the Hugging Face Hub: `org/name` (a safetensors repo) or `org/name:file.gguf`, made local.

    resolve_model("meta-llama/Llama-2-7b-hf")                 -> the snapshot folder in the Hub cache
    resolve_model("org/name", revision="a1b2c3...")            -> that revision's snapshot
    resolve_model("bartowski/SmolLM2-135M-GGUF:SmolLM2-135M-Q8_0.gguf")  -> that one file

A path that exists locally always wins. `huggingface_hub` does the download
(the config, tokenizer files, `*.safetensors` and their index; a GGUF repo's
one named file) with its progress bar and its cache, and reads the user's own
environment when it is called: `HF_TOKEN` (or `huggingface-cli login`) for
private and gated repos, `HF_HUB_OFFLINE=1` to use only what is cached,
`HF_ENDPOINT` for a mirror, `HF_HUB_CACHE` for where the cache is. Every
failure is one line naming the repo and what to do.
"""

from __future__ import annotations

import os
import re

from qst_jax.errors import QSTError

# What a model repo's snapshot needs: config, tokenizer, weights (sharded ones through their index).
MODEL_FILES = ["config.json", "generation_config.json", "*.safetensors", "model.safetensors.index.json",
               "tokenizer.json", "tokenizer.model", "tokenizer_config.json", "special_tokens_map.json",
               "added_tokens.json", "vocab.json", "merges.txt", "spiece.model", "chat_template.jinja",
               "chat_template.json"]
_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(QSTError, OSError):
    """A model could not be had from the Hub; the message names the repo and what to do."""


def is_hub_id(path: str) -> bool:
    """Whether `path` names a Hub repo (`org/name`, optionally `:file.gguf`) rather than a local path."""
    repo = path.split(":", 1)[0]
    return bool(_REPO_ID.match(repo)) and not os.path.exists(os.path.expanduser(path)) and \
        not path.startswith((".", "/", "~"))


def _offline() -> bool:
    """Offline mode: `HF_HUB_OFFLINE` as huggingface_hub read it at its import, or as it is now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


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
    from huggingface_hub import hf_hub_download, snapshot_download

    common = {"revision": revision or None, "local_files_only": _offline(),
              "cache_dir": os.environ.get("HF_HUB_CACHE") or None, "endpoint": os.environ.get("HF_ENDPOINT") or None}
    try:
        if filename:
            return hf_hub_download(repo, filename, **common)
        if config_only:
            return os.path.dirname(hf_hub_download(repo, "config.json", **common))
        return snapshot_download(repo, allow_patterns=MODEL_FILES, **common)
    except Exception as err:  # noqa: BLE001 - huggingface_hub's and the network's errors, each named below
        raise HubError(_explain(repo, filename, revision, err), field="model.path") from None


def _explain(repo: str, filename: str, revision: str | None, err: Exception) -> str:
    from huggingface_hub import errors

    what = f"{repo}:{filename}" if filename else repo
    at = f" at revision {revision!r}" if revision else ""
    if isinstance(err, errors.GatedRepoError):
        return (f"{what}: a gated model: accept its licence on its Hub page (https://huggingface.co/{repo}), then "
                "log in with `huggingface-cli login` or set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"{what}: no such model repo on the Hub, or a private one: check the name, or log in with "
                "`huggingface-cli login` (or set HF_TOKEN) if it is yours")
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{what}: the repo has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(err, errors.EntryNotFoundError) and filename and \
            not isinstance(err, errors.LocalEntryNotFoundError):
        return f"{what}: the repo has no file {filename!r}{at}"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        if _offline():
            return (f"{what}{at}: not in the Hub cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to "
                    "download it, or download it where there is a network (`huggingface-cli download "
                    f"{repo}`) and copy the cache")
        return (f"{what}{at}: the Hub cannot be reached and the files are not cached ({_first_line(err)}); with "
                "a network, try again; without one, set HF_HUB_OFFLINE=1 and use a cached model")
    return f"{what}{at}: the Hub download failed ({type(err).__name__}: {_first_line(err)})"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]
