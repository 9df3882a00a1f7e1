"""The Hugging Face Hub, as every room reaches it: a repo's files made local through `huggingface_hub`.

    local = download("org/name")                                  # a model repo's snapshot folder
    local = download("org/set", repo_type="dataset", allow_patterns=["sst2/*", "README.md"])
    path = download("org/name", filename="model.gguf")            # one file

`huggingface_hub` does the download with its progress bar and its cache,
and reads the user's own environment when it is called: `HF_TOKEN` (or
`huggingface-cli login`) for private and gated repos, `HF_HUB_OFFLINE=1` to
use only what is cached, `HF_ENDPOINT` for a mirror, `HF_HUB_CACHE` for where
the cache is. Every failure is one `HubError` line naming the repo and what
to do. `models.hub` (models) and `data.sources` (data sets) build on it.
"""

from __future__ import annotations

import os
import re
from collections.abc import Sequence

from qst_jax.errors import QSTError

_REPO_ID = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]*/[A-Za-z0-9][A-Za-z0-9._-]*$")


class HubError(QSTError, OSError):
    """Files could not be had from the Hub; the message names the repo and what to do."""


def is_repo_id(name: str) -> bool:
    """Whether `name` has the form of a Hub repo id, `org/name`."""
    return bool(_REPO_ID.match(name))


def offline() -> bool:
    """Offline mode: `HF_HUB_OFFLINE` as huggingface_hub read it at its import, or as it is now."""
    from huggingface_hub import constants

    return bool(constants.HF_HUB_OFFLINE) or \
        os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in ("1", "true", "yes", "on")


def download(repo: str, *, repo_type: str = "model", revision: str | None = None, filename: str | None = None,
             allow_patterns: Sequence[str] | None = None, field: str | None = None) -> str:
    """The local snapshot folder of `repo` (only `allow_patterns`), or the local path of its one `filename`.

    Args:
      repo_type: "model" or "dataset".
      revision: a branch, tag or commit (None: the default branch).
      field: the config key the repo was named by (the error's `field`).

    Raises:
      HubError: a missing, private or gated repo, a missing revision or file,
        no network, or offline mode without the files cached.
    """
    from huggingface_hub import hf_hub_download, snapshot_download

    common = {"repo_type": repo_type, "revision": revision or None, "local_files_only": offline(),
              "cache_dir": os.environ.get("HF_HUB_CACHE") or None, "endpoint": os.environ.get("HF_ENDPOINT") or None}
    try:
        if filename:
            return hf_hub_download(repo, filename, **common)
        return snapshot_download(repo, allow_patterns=list(allow_patterns) if allow_patterns else None, **common)
    except Exception as err:  # noqa: BLE001 - huggingface_hub's and the network's errors, each named below
        raise HubError(explain(repo, repo_type, filename, revision, err), field=field) from None


def explain(repo: str, repo_type: str, filename: str | None, revision: str | None, err: Exception) -> str:
    """One line: what went wrong getting `repo` (its `filename`) and what to do."""
    from huggingface_hub import errors

    what = f"{repo}:{filename}" if filename else repo
    at = f" at revision {revision!r}" if revision else ""
    kind = "data set" if repo_type == "dataset" else "model"
    page = f"https://huggingface.co/{'datasets/' if repo_type == 'dataset' else ''}{repo}"
    cli = f"huggingface-cli download {'--repo-type dataset ' if repo_type == 'dataset' else ''}{repo}"
    if isinstance(err, errors.GatedRepoError):
        return (f"{what}: a gated {kind}: accept its licence on its Hub page ({page}), then log in with "
                "`huggingface-cli login` or set HF_TOKEN")
    if isinstance(err, errors.RepositoryNotFoundError):
        return (f"{what}: no such {kind} repo on the Hub, or a private one: check the name, or log in with "
                "`huggingface-cli login` (or set HF_TOKEN) if it is yours")
    if isinstance(err, errors.RevisionNotFoundError):
        return f"{what}: the repo has no revision {revision!r} (a branch, tag or commit)"
    if isinstance(err, errors.EntryNotFoundError) and filename and \
            not isinstance(err, errors.LocalEntryNotFoundError):
        return f"{what}: the repo has no file {filename!r}{at}"
    if isinstance(err, (errors.LocalEntryNotFoundError, errors.OfflineModeIsEnabled)):
        if offline():
            return (f"{what}{at}: not in the Hub cache and HF_HUB_OFFLINE is set: unset HF_HUB_OFFLINE to "
                    f"download it, or download it where there is a network (`{cli}`) and copy the cache")
        return (f"{what}{at}: the Hub cannot be reached and the files are not cached ({_first_line(err)}); with "
                f"a network, try again; without one, set HF_HUB_OFFLINE=1 and use a cached {kind}")
    return f"{what}{at}: the Hub download failed ({type(err).__name__}: {_first_line(err)})"


def _first_line(err: Exception) -> str:
    return (str(err).strip().splitlines() or [""])[0]


def push(repo: str, files: dict[str, bytes], *, message: str, private: bool = False) -> str:
    """Commits `files` (path in the repo -> content) to model repo `repo`, creating it if needed.

    Returns:
      The commit's URL.

    Raises:
      HubError: offline mode, no token or one without write access, or the Hub refusing.
    """
    from huggingface_hub import CommitOperationAdd, HfApi, errors

    if offline():
        raise HubError(f"{repo}: cannot push with HF_HUB_OFFLINE set; unset it (pushing needs the network)")
    api = HfApi(endpoint=os.environ.get("HF_ENDPOINT") or None)
    try:
        api.create_repo(repo, private=private, exist_ok=True)
        info = api.create_commit(repo, operations=[CommitOperationAdd(path_in_repo=name, path_or_fileobj=data)
                                                   for name, data in files.items()], commit_message=message)
    except errors.HfHubHTTPError as err:
        status = getattr(err.response, "status_code", None)
        if status in (401, 403):
            raise HubError(f"{repo}: the Hub refused the push ({status}): log in with `huggingface-cli login` or set "
                           "HF_TOKEN to a token with write access to it") from None
        raise HubError(f"{repo}: the push failed ({status}: {_first_line(err)})") from None
    except Exception as err:  # noqa: BLE001 - the network's errors
        raise HubError(f"{repo}: the push failed ({type(err).__name__}: {_first_line(err)}); is the Hub reachable?") \
            from None
    return str(info.commit_url)
