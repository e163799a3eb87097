"""Upload a folder to the Hugging Face Hub as ONE commit, with errors that name the fix.

The endpoint is huggingface_hub's own setting, HF_ENDPOINT (default https://huggingface.co); the token is read
from HF_TOKEN only (never from the command line, never logged or printed).

`upload` creates the repository if needed (`create_repo(exist_ok=True)`, with `private` applied to a new
repository only), then sends every file in one `create_commit`. `upload_folder` is not used: with hf_xet
installed it commits a large folder in several batches, and a failure between batches would leave a repository
that looks published but lacks files. A commit is atomic on the Hub: until it lands, the repository shows
nothing of this upload. Large files are uploaded before the commit (LFS / Xet, as the Hub asks); when the upload
fails, re-running the same command uploads again and makes the one commit, and files the Hub already holds
(same content hash) are not sent twice.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

TOKEN_ENV = "HF_TOKEN"
DEFAULT_ENDPOINT = "https://huggingface.co"


class HubError(ValueError):
    """The Hub refused the upload or could not be reached; the message names the fix."""


@dataclass(frozen=True)
class Uploaded:
    repo_url: str
    commit_url: str
    commit_oid: str
    files: list[str]


def endpoint() -> str:
    return (os.environ.get("HF_ENDPOINT") or DEFAULT_ENDPOINT).rstrip("/")


def token_from_env() -> str:
    token = os.environ.get(TOKEN_ENV, "").strip()
    if not token:
        raise HubError(
            f"{TOKEN_ENV} is not set: create a token with write access at https://huggingface.co/settings/tokens "
            f"and export {TOKEN_ENV}=hf_... (the token is read from the environment only), or use --dry-run --out DIR"
        )
    return token


def check_repo_id(repo_id: str) -> str:
    parts = repo_id.split("/")
    if len(parts) != 2 or not all(parts) or any(c.isspace() for c in repo_id):
        raise HubError(f"--repo-id {repo_id!r} is not owner/name: pass e.g. --repo-id your-name/tulpar-tiny")
    return repo_id


def _translate(exc: BaseException, repo_id: str, where: str) -> HubError | None:
    """The Hub's refusals and network failures as HubError; None for anything else (a bug: re-raised as is)."""
    import httpx2
    from huggingface_hub.errors import HfHubHTTPError, OfflineModeIsEnabled

    if isinstance(exc, OfflineModeIsEnabled):
        return HubError(
            "HF_HUB_OFFLINE is set, so nothing can be uploaded: unset it, or use --dry-run --out DIR"
        )
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        if status in (401, 403):
            return HubError(
                f"the Hub at {where} refused to write {repo_id!r} (HTTP {status}): the repository or its owner "
                f"belongs to someone else, or {TOKEN_ENV} has no write access there. Use a repository under your "
                "own account or an organisation you can write to (--repo-id <you>/<name>), or a token with write "
                "permission. Nothing was committed."
            )
        detail = (exc.server_message or str(exc)).splitlines()[0][:300] if str(exc) else ""
        return HubError(
            f"the Hub at {where} answered HTTP {status} for {repo_id!r} ({detail}): nothing was committed; fix what "
            "it says, or re-run later if it is a server error (5xx)"
        )
    if isinstance(exc, httpx2.TransportError):  # connection refused, DNS, TLS, timeouts
        return HubError(
            f"the Hub at {where} could not be reached ({type(exc).__name__}: {str(exc)[:200]}): check the network "
            "and HF_ENDPOINT, then re-run the same command. The upload is resumable: nothing was committed, so the "
            "repository does not show a partial model, and files the Hub already received are not sent again."
        )
    return None


def upload(
    folder: Path,
    repo_id: str,
    *,
    token: str,
    private: bool,
    revision: str | None,
    commit_message: str,
) -> Uploaded:
    """Create `repo_id` if missing and commit every file under `folder` in one commit."""
    from huggingface_hub import CommitOperationAdd, HfApi

    where = endpoint()
    api = HfApi(endpoint=where, token=token)
    files = sorted(str(p.relative_to(folder)) for p in folder.rglob("*") if p.is_file())
    try:
        repo_url = api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
        if revision and revision != "main":
            api.create_branch(repo_id, branch=revision, repo_type="model", exist_ok=True)
        info = api.create_commit(
            repo_id,
            operations=[CommitOperationAdd(path_in_repo=f, path_or_fileobj=str(folder / f)) for f in files],
            commit_message=commit_message,
            repo_type="model",
            revision=revision,
        )
    except Exception as exc:
        err = _translate(exc, repo_id, where)
        if err is None:
            raise
        raise err from None
    return Uploaded(str(repo_url), str(info.commit_url), str(info.oid), files)
