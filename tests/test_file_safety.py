"""bake writes only its own outputs: never into, over or around the source, never outside the output, never over
something it did not write, never half an output (read-only folders, full disks, races, SIGTERM, SIGKILL)."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from conftest import save_tiny, tiny_config, tree_digest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import bake
from bake import checkpoint
from bake.checkpoint import rename_noreplace
from bake.cli import main
from bake.errors import BakeError, OutputExists
from bake.formats.hf.undo import unbake
from bake.vectorfile import VectorSet

REPO = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("one_thread")


def invoke(*args):
    return CliRunner().invoke(main, [str(a) for a in args])


def one_error_line(result) -> str:
    """Exit 1, no traceback, exactly one line of output and it is ``Error: ...`` (the line is returned)."""
    assert result.exit_code == 1, result.output
    assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
    lines = [ln for ln in result.output.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("Error: "), result.output
    return lines[0]


def no_staging(folder: Path) -> None:
    """Nothing bake stages with (``.NAME.tmp-*``, ``.NAME.old-*``) is left in ``folder``."""
    stray = [p.name for p in folder.iterdir() if p.name.startswith(".") and (".tmp-" in p.name or ".old-" in p.name)]
    assert not stray, stray


def _vectors(seed: int = 3) -> VectorSet:
    g = torch.Generator().manual_seed(seed)
    return VectorSet({(1, "resid_post"): torch.randn(32, generator=g)})


@pytest.fixture
def world(tmp_path, tiny_models):
    """A copy of the tiny GPT-2 inside ``DIR`` beside an unrelated file, a vector file, and a baked output."""
    root = tmp_path / "DIR"
    src = root / "model"
    shutil.copytree(tiny_models["gpt2"], src)
    (root / "notes.txt").write_text("mine")
    vec = _vectors().save(tmp_path / "v.safetensors")
    return {"tmp": tmp_path, "root": root, "src": src, "vec": vec}


# --- item 1: --force and -o never touch the source or what bake did not write -------------------------------


def _case_target(case: str, w: dict) -> tuple[Path, tuple[str, ...], str]:
    """(target, extra args, words the one line must hold) for each refused ``bake fold ... -o`` case."""
    tmp, root, src = w["tmp"], w["root"], w["src"]
    if case == "contains the source":
        return root, ("--force",), "contains the source"
    if case == "is the source":
        return src, ("--force",), "is the source"
    if case == "inside the source":
        return src / "out", (), "is inside the source"
    if case == "symlink to the source":
        (tmp / "link").symlink_to(src)
        return tmp / "link", ("--force",), "is the source"
    if case == "not a bake output":
        (tmp / "theirs").mkdir()
        (tmp / "theirs" / "data.csv").write_text("1,2\n")
        return tmp / "theirs", ("--force",), "not an output bake wrote"
    if case == "a plain file":
        (tmp / "theirs.txt").write_text("x")
        return tmp / "theirs.txt", ("--force",), "a file of 1 bytes"
    if case == "exists without --force":
        (tmp / "theirs").mkdir()
        return tmp / "theirs", (), "already exists"
    if case == "parent is a file":
        (tmp / "afile").write_text("x")
        return tmp / "afile" / "out", (), "is a file, not a folder"
    raise AssertionError(case)


CASES = [
    "contains the source",
    "is the source",
    "inside the source",
    "symlink to the source",
    "not a bake output",
    "a plain file",
    "exists without --force",
    "parent is a file",
]


@pytest.mark.parametrize("case", CASES)
def test_fold_refuses_outputs_it_must_not_write(world, case):
    target, extra, words = _case_target(case, world)
    before = tree_digest(world["tmp"])
    line = one_error_line(invoke("fold", world["src"], world["vec"], "-o", target, *extra))
    assert words in line, line
    assert tree_digest(world["tmp"]) == before  # the source, the unrelated files and the target are untouched
    no_staging(target.parent if target.parent.is_dir() else world["tmp"])


def test_cwd_output_with_force_is_refused_cleanly(world, monkeypatch):
    here = world["tmp"] / "here"
    bake.fold(str(world["src"]), _vectors(), here)  # even a bake output is not replaced while it is the working folder
    monkeypatch.chdir(here)
    before = tree_digest(world["tmp"])
    for out in (".", str(here)):
        assert "current folder" in one_error_line(invoke("fold", world["src"], world["vec"], "-o", out, "--force"))
    assert tree_digest(world["tmp"]) == before
    no_staging(here)
    no_staging(world["tmp"])


def test_force_replaces_a_previous_bake_output_only(world):
    out = world["tmp"] / "baked"
    assert invoke("fold", world["src"], world["vec"], "-o", out).exit_code == 0
    first = json.loads((out / "bake.json").read_text())["created"]
    assert "--force" in one_error_line(invoke("fold", world["src"], world["vec"], "-o", out))
    result = invoke("fold", world["src"], world["vec"], "-o", out, "--force")
    assert result.exit_code == 0, result.output
    assert json.loads((out / "bake.json").read_text())["created"] >= first
    assert sorted(p.name for p in out.parent.iterdir()) == ["DIR", "baked", "v.safetensors"]


def test_library_refusal_says_force_true_and_fails_before_any_work(world, monkeypatch):
    """An existing output is refused before the model is even resolved (and the library names ``force=True``)."""
    out = world["tmp"] / "taken"
    out.mkdir()

    def no_work(*args, **kwargs):
        raise AssertionError("work started before the output was checked")

    monkeypatch.setattr(bake.api, "resolve_model", no_work)
    with pytest.raises(OutputExists, match=r"force=True"):
        bake.fold(str(world["src"]), _vectors(), out)
    recipe = world["tmp"] / "r.yaml"
    recipe.write_text(f"model: {world['src']}\nsteering:\n  - {{name: a, layer: 1, target: [hello there]}}\n")
    with pytest.raises(OutputExists, match=r"force=True"):
        bake.run(bake.load_recipe(recipe), out)


@pytest.mark.parametrize("command", ["vector", "import-cv"])
def test_vector_outputs_replace_only_vector_files(world, command):
    theirs = world["tmp"] / "theirs.safetensors"
    theirs.write_bytes(b"not bake's")
    recipe = world["tmp"] / "r.yaml"
    recipe.write_text(f"model: {world['src']}\nsteering:\n  - {{name: a, layer: 1, target: [hello there]}}\n")
    args = ("vector", recipe) if command == "vector" else ("import-cv", world["tmp"] / "missing.gguf")
    assert "not an output bake wrote" in one_error_line(invoke(*args, "-o", theirs, "--force"))
    assert theirs.read_bytes() == b"not bake's"
    assert "already exists" in one_error_line(invoke(*args, "-o", world["vec"]))


@pytest.mark.parametrize("command", ["sweep", "compare"])
def test_report_outputs_follow_the_same_rules(world, command):
    recipe = world["tmp"] / "r.yaml"
    recipe.write_text(f"model: {world['src']}\nsteering:\n  - {{name: a, layer: 1, target: [hello there]}}\n")
    before = tree_digest(world["tmp"])
    assert "is inside the source" in one_error_line(invoke(command, recipe, "-o", world["src"] / "report"))
    assert "not an output bake wrote" in one_error_line(invoke(command, recipe, "-o", world["root"], "--force"))
    assert tree_digest(world["tmp"]) == before


def test_unbake_never_writes_into_the_baked_folder(world):
    baked = world["tmp"] / "baked"
    bake.fold(str(world["src"]), _vectors(), baked)
    before = tree_digest(baked)
    for out, extra in ((baked / "restored", ()), (baked, ("--force",)), (baked / "bake", ("--force",))):
        line = one_error_line(invoke("unbake", baked, "-o", out, *extra))
        assert "source" in line, line
    assert tree_digest(baked) == before


# --- item 7: read-only folders, a full disk -------------------------------------------------------------------


def _mount_tmpfs(where: Path, options: str) -> None:
    where.mkdir()
    try:
        subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(where)], check=True, capture_output=True)
    except (OSError, subprocess.CalledProcessError) as e:
        pytest.skip(f"cannot mount a tmpfs here (needs root and mount(8)): {e}")


@pytest.fixture
def mounted(tmp_path):
    mounts = []

    def mount(name: str, options: str) -> Path:
        where = tmp_path / name
        _mount_tmpfs(where, options)
        mounts.append(where)
        return where

    yield mount
    for where in mounts:
        subprocess.run(["umount", str(where)], check=False)


@pytest.mark.parametrize("nested", [False, True])
@pytest.mark.parametrize("command", ["fold", "vector"])
def test_read_only_output_folder_is_one_line(world, mounted, nested, command):
    ro = mounted("ro", "ro,size=1m")
    target = (ro / "a" / "b" if nested else ro) / ("out" if command == "fold" else "v.safetensors")
    recipe = world["tmp"] / "r.yaml"
    recipe.write_text(f"model: {world['src']}\nsteering:\n  - {{name: a, layer: 1, target: [hello there]}}\n")
    args = ("fold", world["src"], world["vec"]) if command == "fold" else ("vector", recipe)
    before = tree_digest(world["root"])
    assert "read-only" in one_error_line(invoke(*args, "-o", target))
    assert list(ro.iterdir()) == []
    assert tree_digest(world["root"]) == before


def test_too_little_free_space_is_refused_before_the_work(world, monkeypatch):
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1000)
    needed = checkpoint.folder_bytes(world["src"])
    line = one_error_line(invoke("fold", world["src"], world["vec"], "-o", world["tmp"] / "out"))
    assert f"needs about {needed} bytes" in line and "1000 free" in line, line
    assert not (world["tmp"] / "out").exists()
    no_staging(world["tmp"])


def test_a_disk_that_fills_during_the_fold_leaves_nothing(world, mounted, monkeypatch):
    small = mounted("small", "size=64k")
    assert checkpoint.folder_bytes(world["src"]) > 64 * 1024, "the tiny model must not fit the 64k tmpfs"
    monkeypatch.setattr(checkpoint, "free_bytes", lambda path: 1 << 40)  # the estimate misses: the real disk fills
    before = tree_digest(world["root"])
    assert "disk is full" in one_error_line(invoke("fold", world["src"], world["vec"], "-o", small / "out"))
    assert list(small.iterdir()) == []
    assert tree_digest(world["root"]) == before


# --- item 3: the final rename never replaces ------------------------------------------------------------------


@pytest.mark.parametrize("native", [True, False])
@pytest.mark.parametrize("kind", ["folder", "file"])
@pytest.mark.parametrize("existing", ["folder", "empty folder", "file"])
def test_rename_noreplace_refuses_an_existing_target(tmp_path, monkeypatch, native, kind, existing):
    if not native:
        monkeypatch.setattr(checkpoint, "_renameat2", None)  # the link / mkdir-lock fallback
    src, dst = tmp_path / "src", tmp_path / "dst"
    src.mkdir() if kind == "folder" else src.write_text("new")
    if existing == "file":
        dst.write_text("theirs")
    else:
        dst.mkdir()
        if existing == "folder":
            (dst / "theirs.txt").write_text("theirs")
    before = tree_digest(tmp_path)
    with pytest.raises(FileExistsError):
        rename_noreplace(src, dst)
    assert tree_digest(tmp_path) == before and src.exists() and dst.exists()
    checkpoint._remove(dst)
    rename_noreplace(src, dst)
    assert dst.exists() and not src.exists() and (dst.is_dir() == (kind == "folder"))


def test_a_target_created_during_the_run_is_not_replaced(world, monkeypatch):
    """The deterministic race: another run's output appears between the check and the final rename."""
    out = world["tmp"] / "out"
    real = checkpoint.rename_noreplace

    def other_run_wins(src, dst):
        if dst == out:
            dst.mkdir()
            (dst / "theirs.txt").write_text("the other run's output")
        return real(src, dst)

    monkeypatch.setattr(checkpoint, "rename_noreplace", other_run_wins)
    line = one_error_line(invoke("fold", world["src"], world["vec"], "-o", out))
    assert "was created by another run" in line and "--force" in line, line
    assert (out / "theirs.txt").read_text() == "the other run's output"
    no_staging(world["tmp"])


def _bake(*args: str, **popen) -> subprocess.Popen:
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [sys.executable, "-m", "bake", *args],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        **popen,
    )


def _error_lines(stderr: str) -> list[str]:
    return [ln for ln in stderr.splitlines() if ln.startswith("Error:") or "Traceback" in ln]


def test_two_concurrent_folds_to_one_output_one_wins(world):
    out = world["tmp"] / "out"
    procs = [_bake("fold", str(world["src"]), str(world["vec"]), "-o", str(out)) for _ in range(2)]
    results = [(p.wait(timeout=600), p.stderr.read()) for p in procs]
    assert sorted(code for code, _ in results) == [0, 1], results
    loser = next(err for code, err in results if code == 1)
    assert len(_error_lines(loser)) == 1, loser
    assert any(w in loser for w in ("already exists", "was created by another run", "another bake run")), loser
    assert bake.manifest.read(out).format == "bake-manifest/1"
    no_staging(world["tmp"])


# --- item 8: SIGTERM and SIGKILL ------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def slow_model(tmp_path_factory) -> Path:
    """A GPT-2 big enough (tens of MB) that a fold's staging lives long enough to be signalled."""
    return save_tiny(tmp_path_factory.mktemp("slow") / "gpt2", tiny_config("gpt2", n_embd=512, n_layer=4, n_head=4))


def _wait_for_staging(folder: Path, proc: subprocess.Popen) -> Path:
    while proc.poll() is None:
        found = [p for p in folder.iterdir() if p.name.startswith(".out.tmp-")]
        if found:
            return found[0]
        time.sleep(0.005)
    raise AssertionError(f"the fold ended ({proc.returncode}) before its staging folder was seen: {proc.stderr.read()}")


def test_sigterm_removes_the_staging_and_exits_143(slow_model, tmp_path):
    vec = VectorSet({(1, "resid_post"): torch.linspace(-4, 4, 512)}).save(tmp_path / "v.safetensors")
    before = tree_digest(slow_model)
    proc = _bake("fold", str(slow_model), str(vec), "-o", str(tmp_path / "out"))
    _wait_for_staging(tmp_path, proc)
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=120) == 143
    lines = _error_lines(proc.stderr.read())
    assert lines == ["Error: stopped by SIGTERM: nothing was written (staging removed)"], lines
    assert sorted(p.name for p in tmp_path.iterdir()) == ["v.safetensors"]
    assert tree_digest(slow_model) == before


def test_staging_left_by_sigkill_is_removed_by_the_next_run(slow_model, tmp_path):
    vec = VectorSet({(1, "resid_post"): torch.linspace(-4, 4, 512)}).save(tmp_path / "v.safetensors")
    proc = _bake("fold", str(slow_model), str(vec), "-o", str(tmp_path / "out"))
    staging = _wait_for_staging(tmp_path, proc)
    proc.kill()
    proc.wait(timeout=60)
    assert staging.exists()  # SIGKILL cannot clean up
    result = invoke("fold", slow_model, vec, "-o", tmp_path / "out")
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "v.safetensors"]


class _Signal(BaseException):
    """Stands for the exception a SIGTERM raises (bake.cli's handler) at one chosen instant."""


def _signal_after(monkeypatch, name: str, calls: int = 1) -> None:
    """The signal arrives right after the ``calls``-th call of ``bake.checkpoint.NAME`` returns (the narrowest
    window a real signal could hit), deterministically."""
    real, seen = getattr(checkpoint, name), []

    def hit(*args, **kwargs):
        result = real(*args, **kwargs)
        seen.append(1)
        if len(seen) == calls:
            raise _Signal
        return result

    monkeypatch.setattr(checkpoint, name, hit)


@pytest.mark.parametrize("file", [False, True], ids=["folder", "file"])
def test_a_signal_right_after_the_staging_is_created_leaves_nothing(monkeypatch, tmp_path, file):
    _signal_after(monkeypatch, "_create_staging")
    with pytest.raises(_Signal), checkpoint.staged_output(tmp_path / "out", file=file):
        raise AssertionError("the body must not run")
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(("calls", "kept"), [(1, "old"), (2, "new")], ids=["old moved aside", "new renamed in"])
def test_a_signal_while_force_replaces_keeps_one_whole_output(monkeypatch, tmp_path, calls, kept):
    """``--force`` moves the old output aside, then renames the new one in: a signal after either rename leaves
    exactly one output, whole, and nothing beside it."""
    target = tmp_path / "out"
    target.mkdir()
    (target / "w").write_text("old")
    _signal_after(monkeypatch, "rename_noreplace", calls)
    with pytest.raises(_Signal), checkpoint.staged_output(target, force=True, ours=lambda p: True) as staging:
        (staging / "w").write_text("new")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert (target / "w").read_text() == kept


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_an_old_output_a_killed_force_moved_aside_is_put_back(world):
    """SIGKILL between ``--force``'s two renames leaves the old output aside under the dead run's pid: the next
    run puts it back before looking at the target, so it is refused as existing, not lost."""
    out = world["tmp"] / "out"
    bake.fold(str(world["src"]), _vectors(), out)
    before = tree_digest(out)
    aside = world["tmp"] / f".out.old-{_dead_pid()}-abcd1234"
    out.rename(aside)
    line = one_error_line(invoke("fold", world["src"], world["vec"], "-o", out))
    assert "already exists" in line, line
    assert tree_digest(out) == before
    no_staging(world["tmp"])


def test_staging_of_a_live_run_is_named_and_kept(world):
    """A staging folder whose process still runs is another bake at work: refused, left alone."""
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        staging = world["tmp"] / f".out.tmp-{sleeper.pid}-abcd1234"
        staging.mkdir()
        line = one_error_line(invoke("fold", world["src"], world["vec"], "-o", world["tmp"] / "out"))
        assert f"pid {sleeper.pid}" in line and "is writing" in line, line
        assert staging.is_dir() and not (world["tmp"] / "out").exists()
    finally:
        sleeper.kill()
        sleeper.wait()


# --- item 2: names read from a manifest or index stay inside the folder -------------------------------------


@pytest.fixture
def baked(world) -> Path:
    out = world["tmp"] / "baked"
    bake.fold(str(world["src"]), _vectors(), out)
    return out


def _edit(folder: Path, change) -> None:
    manifest = json.loads((folder / "bake.json").read_text())
    change(manifest)
    (folder / "bake.json").write_text(json.dumps(manifest))


HOSTILE = {
    "shard escapes": lambda m: m["fold"]["undo"]["shards"].update(
        {"../../../x.safetensors": {"file": "../../../../etc/hostname", "rewritten": False}}
    ),
    "absolute shard file": lambda m: next(iter(m["fold"]["undo"]["shards"].values())).update(file="/etc/hostname"),
    "vector file escapes": lambda m: m.update(vector_file="../../v.safetensors"),
    "undo folder absolute": lambda m: m["fold"]["undo"].update(folder="/etc"),
    "written with a separator": lambda m: m["fold"]["undo"]["written"].append("a/../../b"),
    "unknown top-level key": lambda m: m.update(vector_files="x"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
@pytest.mark.parametrize("command", ["unbake", "inspect"])
def test_hostile_manifest_names_are_refused(baked, world, case, command):
    _edit(baked, HOSTILE[case])
    before = tree_digest(world["tmp"])
    args = ("unbake", baked, "-o", world["tmp"] / "restored") if command == "unbake" else ("inspect", baked)
    line = one_error_line(invoke(*args))
    assert "bake.json" in line or "outside the folder" in line, line
    assert tree_digest(world["tmp"]) == before


@pytest.mark.parametrize("headers", ["not json", "[]", '{"../x.safetensors": "{}"}'])
def test_a_broken_undo_record_is_refused(baked, world, headers):
    (baked / "bake" / "undo" / "headers.json").write_text(headers)
    line = one_error_line(invoke("unbake", baked, "-o", world["tmp"] / "restored"))
    assert "headers.json" in line and "does not list the rewritten shards" in line, line
    assert not (world["tmp"] / "restored").exists()


def test_a_symlink_leading_out_of_the_folder_is_refused(baked, world):
    vectors = baked / "bake" / "vectors.safetensors"
    shutil.move(vectors, world["tmp"] / "elsewhere.safetensors")
    vectors.symlink_to(world["tmp"] / "elsewhere.safetensors")
    assert "leads outside the folder" in one_error_line(invoke("inspect", baked))


def test_unbake_copies_no_file_from_outside_through_a_symlink(baked, world):
    (world["tmp"] / "secret.txt").write_text("not for the output")
    (baked / "notes.txt").symlink_to(world["tmp"] / "secret.txt")
    line = one_error_line(invoke("unbake", baked, "-o", world["tmp"] / "restored"))
    assert "notes.txt" in line and "leads outside the folder" in line, line
    assert not (world["tmp"] / "restored").exists()


def test_index_entries_must_be_plain_names(world):
    src = world["root"] / "sharded"
    save_tiny(src, tiny_config("gpt2"), max_shard_size="100KB")
    index = json.loads((src / "model.safetensors.index.json").read_text())
    name = next(iter(index["weight_map"]))
    index["weight_map"][name] = "../model/model.safetensors"
    (src / "model.safetensors.index.json").write_text(json.dumps(index))
    line = one_error_line(invoke("fold", src, world["vec"], "-o", world["tmp"] / "out"))
    assert "weight_map" in line and "plain file name" in line, line


_NAMES = st.one_of(
    st.sampled_from(
        [
            "..",
            "../x",
            "/etc/hostname",
            "a/../../b",
            "bake/../../x",
            "",
            ".",
            "a\\..\\b",
            "x\x00y",
            "../../../../etc/passwd",
            "bake/undo/../../../z",
            "model.safetensors",
        ]
    ),
    st.text(alphabet="./\\ab", max_size=12),
)
_JSON = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | _NAMES,
    lambda kids: st.lists(kids, max_size=3) | st.dictionaries(_NAMES, kids, max_size=3),
    max_leaves=8,
)
_PATHS = [
    ("vector_file",),
    ("fold", "undo", "folder"),
    ("fold", "undo", "originals"),
    ("fold", "undo", "written"),
    ("fold", "undo", "shards"),
    ("fold", "biases"),
    ("fold",),
    ("base",),
    ("fold", "remote_code"),
]


@pytest.fixture(scope="module")
def fuzz_bake(tmp_path_factory, tiny_models) -> tuple[Path, str]:
    root = tmp_path_factory.mktemp("fuzz")
    bake.fold(str(tiny_models["gpt2"]), _vectors(), root / "baked")
    return root, (root / "baked" / "bake.json").read_text()


# A longer fuzz: BAKE_FUZZ_EXAMPLES=5000 python -m pytest tests/test_file_safety.py -k fuzzed
@settings(
    derandomize=True,
    max_examples=int(os.environ.get("BAKE_FUZZ_EXAMPLES", "200")),
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)
@given(where=st.sampled_from(_PATHS), value=st.one_of(_NAMES, _JSON), shard_value=_NAMES)
def test_fuzzed_manifest_ends_in_bake_error_and_writes_nowhere_else(fuzz_bake, where, value, shard_value):
    """Random hostile values at the places a manifest names files: unbake and inspect end in a BakeError (or work),
    never another exception, and nothing appears anywhere but in the output."""
    root, text = fuzz_bake
    folder = root / "baked"
    manifest = json.loads(text)
    node = manifest
    for key in where[:-1]:
        node = node[key]
    node[where[-1]] = {shard_value: {"file": value, "rewritten": False}} if where[-1] == "shards" else value
    (folder / "bake.json").write_text(json.dumps(manifest))
    before = tree_digest(root)
    out = root / "restored"
    try:
        for attempt in (lambda: bake.manifest.read(folder), lambda: unbake(folder, out)):
            try:
                attempt()
            except BakeError as e:
                assert "\n" not in str(e)
        result = invoke("inspect", folder)
        assert result.exception is None or isinstance(result.exception, SystemExit), repr(result.exception)
        assert {k: v for k, v in tree_digest(root).items() if not k.startswith("restored/")} == before
        assert sorted(p.name for p in root.iterdir()) in (["baked"], ["baked", "restored"])
    finally:
        shutil.rmtree(out, ignore_errors=True)
        (folder / "bake.json").write_text(text)


# --- GGUF outputs follow the same rules -----------------------------------------------------------------------


def test_gguf_output_rules(tmp_path):
    pytest.importorskip("gguf", reason="GGUF output needs the gguf package (the test extra installs it)")
    from test_gguf_export import write_gguf

    src = write_gguf(tmp_path / "llama.gguf", "llama")
    vec = VectorSet({(1, "resid_post"): torch.linspace(-1, 1, 32)}).save(tmp_path / "v.safetensors")
    theirs = tmp_path / "theirs.gguf"
    shutil.copyfile(src, theirs)  # a GGUF, but not one bake wrote
    before = tree_digest(tmp_path)
    assert "is the source" in one_error_line(invoke("fold", src, vec, "-o", src, "--force"))
    assert "not an output bake wrote" in one_error_line(invoke("fold", src, vec, "-o", theirs, "--force"))
    assert tree_digest(tmp_path) == before
    out = tmp_path / "out.gguf"
    assert invoke("fold", src, vec, "-o", out).exit_code == 0
    assert "--force" in one_error_line(invoke("fold", src, vec, "-o", out))
    result = invoke("fold", src, vec, "-o", out, "--force")  # a steered GGUF bake wrote is replaced
    assert result.exit_code == 0, result.output
    assert set(tree_digest(tmp_path)) == set(before) | {"out.gguf"}
    no_staging(tmp_path)
