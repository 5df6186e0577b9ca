"""Downloading from the Hugging Face Hub (a base model, or a release to inspect), and why the Hub refused a request."""

from __future__ import annotations

from pathlib import Path

from bake.errors import BakeError

ENDPOINT = "https://huggingface.co"


def hub_refusal(error: Exception, repo_id: str) -> str:
    status = getattr(getattr(error, "response", None), "status_code", None)
    if status == 401:
        return "the token is invalid or expired (run `hf auth login` again)"
    if status == 403:
        return (
            f"your token may not write to the namespace {repo_id.split('/')[0]!r} (a repository owned by someone else, "
            "or a read-only token): push to your own namespace or ask for access"
        )
    if status == 404:
        return "the repository or branch does not exist or is not visible to this token"
    return f"HTTP {status}" if status else error.__class__.__name__


def download(repo_id: str, revision: str | None = None, allow_patterns: list[str] | None = None) -> Path:
    """A local copy of a Hub repository (by default every file: inspecting checks all the weights)."""
    from huggingface_hub import snapshot_download  # startup
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError  # startup

    try:
        return Path(snapshot_download(repo_id, revision=revision, allow_patterns=allow_patterns))
    except LocalEntryNotFoundError:
        raise BakeError(
            f"cannot reach the Hugging Face Hub for {repo_id!r} and it is not cached: go online or give a local folder"
        ) from None
    except HfHubHTTPError as e:
        raise BakeError(
            f"the Hub refused {repo_id!r} ({hub_refusal(e, repo_id)}): check the id, revision and your token"
        ) from None
