"""bake push against huggingface_hub with its HTTP layer replaced by a fake Hub: exact repo, files,
commit, branch and tag; clear errors that never show the token; the card parses back."""

from __future__ import annotations

import base64
import hashlib
import json
import re

import huggingface_hub
import pytest
import torch
from click.testing import CliRunner
from huggingface_hub import ModelCard
from huggingface_hub.utils import httpx as httpx2  # the HTTP library huggingface_hub uses
from safetensors.torch import load_file, save_file

import bake
from bake.cli import main
from bake.vectorfile import VectorSet

TOKEN = "hf_fake_secret_token_0123456789"


class FakeHub:
    """Just enough of the Hub's HTTP API for one push: repos, branches, preupload, LFS, commits, tags."""

    def __init__(self, writable=("alice",), existing=(), fail=None):
        self.writable, self.existing, self.fail = set(writable), set(existing), fail or {}
        self.requests: list[tuple[str, str]] = []
        self.created: list[dict] = []
        self.branches: list[tuple[str, str]] = []
        self.lfs: dict[str, bytes] = {}
        self.commits: list[dict] = []
        self.tags: list[dict] = []
        self.authorizations: set[str] = set()

    def __call__(self, request: httpx2.Request) -> httpx2.Response:
        path = request.url.path
        self.requests.append((request.method, str(request.url)))
        if "authorization" in request.headers:
            self.authorizations.add(request.headers["authorization"])
        for pattern, status in self.fail.items():
            if re.search(pattern, path):
                if status == "unreachable":
                    raise httpx2.ConnectError("[Errno -3] Temporary failure in name resolution", request=request)
                return httpx2.Response(status, json={"error": f"refused {path}"})
        if path == "/api/repos/create":
            body = json.loads(request.content)
            repo = f"{body['organization']}/{body['name']}"
            if repo in self.existing:
                return httpx2.Response(
                    409, json={"error": "You already created this model repo", "url": f"https://huggingface.co/{repo}"}
                )
            if body["organization"] not in self.writable:
                return httpx2.Response(
                    403, json={"error": "You don't have the rights to create a model under this namespace"}
                )
            self.created.append(body)
            return httpx2.Response(200, json={"url": f"https://huggingface.co/{repo}", "name": repo})
        if path == "/api/validate-yaml":
            return httpx2.Response(200, json={"errors": [], "warnings": []})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(branch|preupload|commit|tag)/(.+)", path)
        if m:
            repo, action, rev = m.groups()
            if repo.split("/")[0] not in self.writable:
                return httpx2.Response(403, json={"error": "You don't have write access"})
            if action == "branch":
                self.branches.append((repo, rev))
                return httpx2.Response(200, json={})
            if action == "preupload":
                files = json.loads(request.content)["files"]
                return httpx2.Response(
                    200,
                    json={
                        "files": [
                            {
                                "path": f["path"],
                                "uploadMode": "lfs" if f["path"].endswith(".safetensors") else "regular",
                                "shouldIgnore": False,
                            }
                            for f in files
                        ]
                    },
                )
            if action == "commit":
                lines = [json.loads(line) for line in request.content.decode().splitlines()]
                files = {}
                for line in lines[1:]:
                    v = line["value"]
                    files[v["path"]] = base64.b64decode(v["content"]) if line["key"] == "file" else self.lfs[v["oid"]]
                oid = hashlib.sha1(request.content).hexdigest()
                self.commits.append(
                    {"repo": repo, "revision": rev, "message": lines[0]["value"]["summary"], "files": files, "oid": oid}
                )
                return httpx2.Response(
                    200, json={"commitUrl": f"https://huggingface.co/{repo}/commit/{oid}", "commitOid": oid}
                )
            if action == "tag":
                self.tags.append({"repo": repo, "revision": rev, **json.loads(request.content)})
                return httpx2.Response(200, json={})
        served = self._serve(request)
        if served is not None:
            return served
        if path.endswith("/info/lfs/objects/batch"):
            objects = json.loads(request.content)["objects"]
            return httpx2.Response(
                200,
                json={
                    "transfer": "basic",
                    "objects": [
                        {
                            "oid": o["oid"],
                            "size": o["size"],
                            "actions": {"upload": {"href": f"https://s3.example/{o['oid']}"}},
                        }
                        for o in objects
                    ],
                },
            )
        if request.url.host == "s3.example" and request.method == "PUT":
            self.lfs[path.strip("/")] = request.content
            return httpx2.Response(200)
        return (
            httpx2.Response(200, json={})
            if request.method == "GET"
            else httpx2.Response(404, json={"error": "unknown"})
        )

    def _serve(self, request: httpx2.Request) -> httpx2.Response | None:
        """Read back what was committed: repo info with its file list, and file downloads."""
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/revision/(.+)", request.url.path)
        if m and request.method == "GET":
            commit = next((c for c in reversed(self.commits) if c["repo"] == m[1]), None)
            if commit is None:
                return httpx2.Response(
                    404, json={"error": "Repository not found"}, headers={"x-error-code": "RepoNotFound"}
                )
            return httpx2.Response(
                200, json={"id": m[1], "sha": commit["oid"], "siblings": [{"rfilename": f} for f in commit["files"]]}
            )
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/tree/([^/]+)", request.url.path)
        if m:
            commit = next(c for c in reversed(self.commits) if c["repo"] == m[1])
            return httpx2.Response(
                200,
                json=[
                    {"type": "file", "path": name, "size": len(content), "oid": hashlib.sha1(content).hexdigest()}
                    for name, content in commit["files"].items()
                ],
            )
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", request.url.path)
        if m:
            commit = next(c for c in reversed(self.commits) if c["repo"] == m[1])
            content = commit["files"][m[3]]
            headers = {
                "x-repo-commit": commit["oid"],
                "etag": f'"{hashlib.sha256(content).hexdigest()}"',
                "content-length": str(len(content)),
            }
            return httpx2.Response(200, content=b"" if request.method == "HEAD" else content, headers=headers)
        return None


@pytest.fixture
def fake_hub(monkeypatch, tmp_path):
    """Install a FakeHub as huggingface_hub's HTTP transport (LFS over plain HTTP, not hf_xet)."""
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_DISABLE_XET", True)

    def install(**kwargs) -> FakeHub:
        hub = FakeHub(**kwargs)
        huggingface_hub.set_client_factory(lambda: httpx2.Client(transport=httpx2.MockTransport(hub)))
        return hub

    yield install
    huggingface_hub.set_client_factory(httpx2.Client)


@pytest.fixture
def baked(tmp_path, tiny_models):
    out = tmp_path / "baked"
    g = torch.Generator().manual_seed(2)
    bake.fold(
        str(tiny_models["llama"]),
        VectorSet({(1, "resid_post"): torch.randn(32, generator=g)}),
        out,
        base_model_id="acme/tiny-llama",
    )
    return out


def _push(*args):
    return CliRunner().invoke(main, ["push", *map(str, args)])


def _local_files(folder):
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in folder.rglob("*") if p.is_file()}


def test_push_uploads_every_file_in_one_commit_on_the_branch_and_tags_it(fake_hub, baked):
    hub = fake_hub()
    result = _push(
        baked,
        "alice/tiny-cheer",
        "--revision",
        "release",
        "--tag",
        "v1.2.0",
        "--private",
        "--commit-message",
        "cheerful v1.2.0",
    )
    assert result.exit_code == 0, result.output
    assert hub.created == [{"name": "tiny-cheer", "organization": "alice", "visibility": "private"}]
    assert hub.branches == [("alice/tiny-cheer", "release")]
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert (commit["repo"], commit["revision"], commit["message"]) == ("alice/tiny-cheer", "release", "cheerful v1.2.0")
    local = _local_files(baked)
    assert commit["files"].keys() == local.keys()
    for name, content in local.items():
        if name != "README.md":
            assert commit["files"][name] == content, name
    assert set(hub.lfs.values()) >= {local["model-bake-steering.safetensors"], local["bake/vectors.safetensors"]}
    card = commit["files"]["README.md"].decode()
    assert 'model="alice/tiny-cheer"' in card and "PATH_OR_REPO_ID" not in card
    assert hub.tags == [
        {"repo": "alice/tiny-cheer", "revision": commit["oid"], "tag": "v1.2.0", "message": "cheerful v1.2.0"}
    ]
    assert hub.authorizations == {f"Bearer {TOKEN}"}
    assert commit["oid"][:12] in result.output and "v1.2.0" in result.output
    assert TOKEN not in result.output


def test_dry_run_lists_exactly_what_would_be_uploaded_and_contacts_nothing(fake_hub, baked, monkeypatch):
    hub = fake_hub()
    monkeypatch.delenv("HF_TOKEN")
    result = _push(baked, "alice/tiny-cheer", "--tag", "v1.0.0", "--dry-run")
    assert result.exit_code == 0, result.output
    assert hub.requests == []
    listed = re.findall(r"^  (\S+)  \(", result.output, flags=re.M)
    assert sorted(listed) == sorted(_local_files(baked))
    assert "https://huggingface.co/alice/tiny-cheer (branch main)" in result.output and "'v1.0.0'" in result.output
    assert (
        "no Hugging Face token is set, so the real push would fail" in result.output
        and "hf auth login" in result.output
    )


def test_dry_run_with_a_token_does_not_warn_about_it(fake_hub, baked):
    hub = fake_hub()
    result = _push(baked, "alice/tiny-cheer", "--dry-run")
    assert result.exit_code == 0 and hub.requests == [], result.output
    assert "no Hugging Face token" not in result.output and TOKEN not in result.output


def test_push_without_a_token_says_how_to_log_in(fake_hub, baked, monkeypatch):
    hub = fake_hub()
    monkeypatch.delenv("HF_TOKEN")
    result = _push(baked, "alice/tiny-cheer")
    assert result.exit_code == 1
    assert "no Hugging Face token" in result.output and "hf auth login" in result.output
    assert hub.requests == [] and "Traceback" not in result.output


def test_push_to_someone_elses_repo_is_refused_with_nothing_pushed(fake_hub, baked):
    hub = fake_hub(writable=("alice",), existing=("bob/model",))
    result = _push(baked, "bob/model", "--tag", "v1")
    assert result.exit_code == 1
    assert (
        "'bob'" in result.output and "owned by someone else" in result.output and "nothing was pushed" in result.output
    )
    assert hub.commits == [] and hub.tags == []
    assert TOKEN not in result.output


def test_unreachable_hub_says_so_and_claims_nothing(fake_hub, baked):
    fake_hub(fail={r"/api/repos/create": "unreachable"})
    result = _push(baked, "alice/tiny-cheer")
    assert result.exit_code == 1
    assert "cannot reach https://huggingface.co" in result.output and "nothing was pushed" in result.output
    assert TOKEN not in result.output and "Traceback" not in result.output


def test_a_failed_tag_reports_the_commit_that_was_pushed(fake_hub, baked):
    hub = fake_hub(fail={r"/tag/": 409})
    result = _push(baked, "alice/tiny-cheer", "--tag", "v1.0.0")
    assert result.exit_code == 1
    assert len(hub.commits) == 1
    assert f"commit {hub.commits[0]['oid'][:12]} was pushed to 'main' but not tagged" in result.output


def test_a_tampered_checkpoint_is_not_published(fake_hub, baked):
    hub = fake_hub()
    shard = baked / "model-bake-steering.safetensors"
    tensors = load_file(shard)
    tensors["model.layers.1.mlp.down_proj.bias"] += 1
    save_file(tensors, shard, metadata={"format": "pt"})
    result = _push(baked, "alice/tiny-cheer")
    assert result.exit_code == 1 and "refusing to publish" in result.output
    assert hub.requests == []


@pytest.mark.parametrize("repo_id", ["no-namespace", "alice/bad name"])
def test_bad_repo_ids_are_one_line_errors(fake_hub, baked, repo_id):
    result = _push(baked, repo_id, "--dry-run")
    assert result.exit_code == 1 and "NAMESPACE/NAME" in result.output


def test_card_parses_back_with_its_metadata_and_sections(baked, tiny_models):
    card = ModelCard.load(baked / "README.md")
    assert card.data.base_model == "acme/tiny-llama"
    assert set(card.data.tags) >= {"steering", "bake", "activation-steering"}
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    for section in (
        "## Steering",
        "## Verification",
        "## Where the steering loads",
        "## How to load",
        "## Provenance",
        "vllm serve",
        "convert_hf_to_gguf.py",
        "| Llama (`llama`) |",
    ):
        assert section in card.text, section


def test_inspect_a_pushed_release_by_repo_id(fake_hub, baked, tmp_path, monkeypatch):
    """bake inspect REPO_ID downloads the release and checks its weights against its manifest."""
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    fake_hub()
    assert _push(baked, "alice/tiny-cheer").exit_code == 0
    result = CliRunner().invoke(main, ["inspect", "alice/tiny-cheer"])
    assert result.exit_code == 0, result.output
    assert "base: acme/tiny-llama" in result.output and "weights: match the manifest" in result.output
    missing = CliRunner().invoke(main, ["inspect", "alice/no-such-model"])
    assert missing.exit_code == 1 and "alice/no-such-model" in missing.output and "Traceback" not in missing.output


def test_a_hub_model_resolves_to_its_downloaded_snapshot(fake_hub, baked, tmp_path, monkeypatch):
    """A Hub id as a model spec: the weights, config, tokenizer and card are downloaded, the commit recorded."""
    from bake.sources.resolve import resolve_model

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub-cache"))
    hub = fake_hub()
    assert _push(baked, "alice/tiny-cheer").exit_code == 0
    source = resolve_model("alice/tiny-cheer")
    assert source.identity == {"kind": "hub", "repo_id": "alice/tiny-cheer", "commit": hub.commits[0]["oid"]}
    for name in (
        "config.json",
        "model-base.safetensors",
        "model-bake-steering.safetensors",
        "tokenizer.json",
        "README.md",
    ):
        assert (source.path / name).read_bytes() == hub.commits[0]["files"][name], name
    for name in (
        "bake/vectors.safetensors",
        "bake/undo/headers.json",
        "bake/undo/config.json",
    ):  # a bake on top carries them on
        assert (source.path / name).read_bytes() == hub.commits[0]["files"][name], name
    with pytest.raises(bake.BakeError, match="'alice/missing'"):
        resolve_model("alice/missing")
