"""Publishing a baked checkpoint to the Hugging Face Hub as a versioned release, and fetching one to inspect.

A push is one commit holding exactly the files of the output folder, the model
card rendered with the repository's id; a tag pins the release to that commit
(not to whatever the branch points at later). The token comes from where
huggingface_hub looks (``HF_TOKEN``, ``hf auth login``) and is never printed.
Failures say what was and was not pushed.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bake import manifest as manifests
from bake.errors import BakeError
from bake.release import card
from bake.sources.hub import ENDPOINT, hub_refusal


@dataclass
class PushPlan:
    """What a push uploads (path in repo → local file) and where; a dry run only shows it."""

    folder: Path
    repo_id: str
    branch: str
    tag: str | None
    private: bool
    commit_message: str
    files: dict[str, Path]
    card_text: str
    pushed: dict[str, Any] = field(default_factory=dict)
    unverified: list[str] = field(default_factory=list)
    """What the check before the push could not verify (an older bake recorded no file hashes)."""

    def describe(self) -> str:
        where = f"{ENDPOINT}/{self.repo_id} (branch {self.branch}{', private' if self.private else ''})"
        lines = [f"would upload {len(self.files)} files to {where} in one commit: {self.commit_message!r}"]
        lines += [
            f"  {name}  ({_size(path.stat().st_size)}{', card rendered for this repo' if name == 'README.md' else ''})"
            for name, path in sorted(self.files.items())
        ]
        if self.tag:
            lines.append(f"then tag that commit {self.tag!r}")
        lines += [f"NOTE: {n}" for n in self.unverified]
        from huggingface_hub import get_token

        if not get_token():  # reads HF_TOKEN or the login file only: a dry run contacts nothing
            lines.append(f"no Hugging Face token is set, so the real push would fail: {_LOGIN}")
        return "\n".join(lines)


def _size(n: int) -> str:
    return f"{n / 2**30:.2f} GB" if n >= 2**30 else f"{n / 2**20:.1f} MB" if n >= 2**20 else f"{n / 1024:.1f} KB"


def plan_push(
    folder: str | Path,
    repo_id: str,
    *,
    branch: str = "main",
    tag: str | None = None,
    private: bool = False,
    commit_message: str | None = None,
) -> PushPlan:
    """Check ``folder`` is an intact baked checkpoint and list what a push would upload."""
    from huggingface_hub.errors import HFValidationError  # startup
    from huggingface_hub.utils import validate_repo_id  # startup

    folder = Path(folder)
    try:
        validate_repo_id(repo_id)
    except HFValidationError:
        raise BakeError(
            f"{repo_id!r} is not a Hub repository id: use NAMESPACE/NAME, e.g. alice/smollm2-cheerful"
        ) from None
    if "/" not in repo_id:
        raise BakeError(f"{repo_id!r} has no namespace: use NAMESPACE/NAME, e.g. alice/{repo_id}")
    manifest = manifests.read(folder)
    problems = manifests.check(folder, manifest)
    if problems:
        raise BakeError(
            f"{str(folder)!r} no longer matches its manifest ({problems[0]}): refusing to publish it; bake it again"
        )
    files = {p.relative_to(folder).as_posix(): p for p in sorted(folder.rglob("*")) if p.is_file()}
    hidden = [name for name in files if any(part.startswith(".") for part in name.split("/"))]
    for name in hidden:  # editor or OS leftovers, never part of a release
        del files[name]
    default_message = (
        f"bake: {', '.join(e['name'] for e in manifest.entries) or 'steering'} on "
        f"{manifest.base.base_model_id or manifest.base.spec}"
    )
    return PushPlan(
        folder,
        repo_id,
        branch,
        tag,
        private,
        commit_message or default_message,
        files,
        card.render(manifest, repo_id=repo_id),
        unverified=manifest.unverified(),
    )


_LOGIN = "run `hf auth login` or set HF_TOKEN (a token with write access)"


def _token() -> str:
    from huggingface_hub import get_token  # startup

    token = get_token()
    if not token:
        raise BakeError(f"no Hugging Face token: {_LOGIN}")
    return token


def push(plan: PushPlan) -> dict[str, Any]:
    """Create the repo if needed, upload every file in one commit on ``plan.branch``, tag it.

    Returns the repo URL, commit id and tag. Errors name the step that failed and
    what was already pushed (nothing, or the commit without its tag).
    """
    from huggingface_hub import CommitOperationAdd, HfApi  # startup
    from huggingface_hub.errors import HfHubHTTPError  # startup
    from huggingface_hub.utils import httpx  # httpx in huggingface_hub 1.x, httpx2 in 2.x

    api = HfApi(token=_token())
    step = "create the repository"
    try:
        url = api.create_repo(plan.repo_id, private=plan.private, exist_ok=True)
        if plan.branch != "main":
            step = f"create branch {plan.branch!r}"
            api.create_branch(plan.repo_id, branch=plan.branch, exist_ok=True)
        step = "upload"
        operations = [
            CommitOperationAdd(name, plan.card_text.encode() if name == "README.md" else path)
            for name, path in sorted(plan.files.items())
        ]
        commit = api.create_commit(
            plan.repo_id, operations=operations, commit_message=plan.commit_message, revision=plan.branch
        )
        plan.pushed = {"url": str(url), "commit": commit.oid, "commit_url": commit.commit_url, "branch": plan.branch}
        if plan.tag:
            step = f"tag the commit {plan.tag!r}"
            api.create_tag(plan.repo_id, tag=plan.tag, revision=commit.oid, tag_message=plan.commit_message)
            plan.pushed["tag"] = plan.tag
    except (httpx.TransportError, ConnectionError) as e:  # ConnectionError: hf_xet's transfers fail that way
        raise BakeError(
            f"cannot reach {ENDPOINT} to {step} ({e.__class__.__name__}): check the network; {_so_far(plan)}"
        ) from None
    except HfHubHTTPError as e:
        raise BakeError(
            f"the Hub refused to {step} on {plan.repo_id!r}: {hub_refusal(e, plan.repo_id)}; {_so_far(plan)}"
        ) from None
    return plan.pushed


def _so_far(plan: PushPlan) -> str:
    if "commit" in plan.pushed:
        return (
            f"commit {plan.pushed['commit'][:12]} was pushed to {plan.branch!r} but not tagged (run `hf repo tag "
            "create` or push again)"
        )
    return "nothing was pushed"
