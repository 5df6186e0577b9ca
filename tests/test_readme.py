"""Every ```bash and ```python block of README.md, then of docs/*.md, runs as written, in order, in a scratch copy.

The rules, so that a README example cannot rot:
- The scratch copy holds the repository's tracked files (``git ls-files``); its own ``bake`` is the one imported
  (PYTHONPATH) and the ``bake`` command runs it. Blocks run in order there, so a block may use what an earlier one
  wrote (``out/cheerful`` from the quickstart).
- A block right after ``<!-- readme-test: skip (REASON) -->`` is not run, and its test skips with REASON. That
  marker is only for what cannot run here: the real Hub, binaries pip does not install.
- A ``pip install ...`` command (one ``&&``-separated part of a line) becomes a no-op when every requirement it names
  is already installed at a matching version (``-e ".[extra]"`` counts when the extra's requirements are); if one
  is missing the test fails and names it, rather than installing into the test environment.
- BAKE_CACHE is this session's cache (conftest), shared with the other tests: the quickstart's dequantized model
  and sampled background are the same inputs whoever computes them first, and are not what these blocks test.
README.md's blocks are the default tier (the quickstart bake and the Python API, a few minutes); docs/ blocks are the
slow tier, and run the README's first when those were deselected.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))
import figures  # noqa: E402  (docs/figures.py: every measured-figures block of the docs)

FENCE = re.compile(
    r"(?:<!-- readme-test: skip \((?P<skip>.+?)\) -->\n)?^(?P<indent> *)```(?P<lang>bash|python)\n"
    r"(?P<body>.*?)^(?P=indent)```",
    re.S | re.M,
)
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
# The README's quickstart: conftest runs it once per session, and test_smollm2 and test_examples read its output.
QUICKSTART = "bake run recipes/quickstart.yaml -o out/cheerful"


@dataclass
class Block:
    page: str
    line: int
    lang: str
    code: str
    skip: str | None

    @property
    def id(self) -> str:
        return f"{self.page}:{self.line}"


def blocks() -> list[Block]:
    found = []
    for page in PAGES:
        text = page.read_text()
        for m in FENCE.finditer(text):
            code = "\n".join(line[len(m["indent"]) :] for line in m["body"].splitlines())
            line = text.count("\n", 0, m.start("body"))
            found.append(Block(str(page.relative_to(ROOT)), line, m["lang"], code, m["skip"]))
    return found


def installed(requirement: str) -> bool:
    """Whether ``requirement`` (a pip argument: NAME[extras]SPEC, or . / .[extras] for this project) is satisfied."""
    if requirement.startswith("."):
        requirement = "bake" + requirement[1:]
    req = Requirement(requirement)
    try:
        version = importlib.metadata.version(req.name)
    except importlib.metadata.PackageNotFoundError:
        return False
    if not req.specifier.contains(version, prereleases=True):
        return False
    needs = [Requirement(r) for r in importlib.metadata.requires(req.name) or []]
    return all(
        installed(str(Requirement(f"{r.name}{r.specifier}")))
        for r in needs
        if r.marker is not None and any(r.marker.evaluate({"extra": e}) for e in req.extras)
    )


def without_installs(code: str) -> str:
    """``code`` with every pip install of what is already installed replaced by ``true``; fails on anything else."""

    def replace(part: str) -> str:
        words = shlex.split(part)
        if words[:2] != ["pip", "install"] and words[:4] != ["python", "-m", "pip", "install"]:
            return part
        wanted = [w for w in words[words.index("install") + 1 :] if not w.startswith("-")]
        missing = [w for w in wanted if not installed(w)]
        assert not missing, f"the docs install {missing}, which this environment lacks: run bash tests/run"
        return " true "

    return "\n".join("&&".join(replace(part) for part in line.split("&&")) for line in code.splitlines())


ALL = blocks()


class Runner:
    """The scratch copy, and which blocks have run in it (each block runs once, after all blocks before it)."""

    def __init__(self, root: Path, cache: Path) -> None:
        self.root = root
        self.done: set[int] = set()
        files = subprocess.run(["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, text=True, check=True)
        for name in filter(None, files.stdout.split("\0")):
            if (ROOT / name).is_file():
                (root / name).parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(ROOT / name, root / name)
        self.env = {**os.environ, "PYTHONPATH": str(root), "BAKE_CACHE": str(cache)}

    def run_through(self, index: int) -> subprocess.CompletedProcess | None:
        result = None
        for i in range(index + 1):
            if i in self.done or ALL[i].skip:
                continue
            self.done.add(i)
            block = ALL[i]
            code = without_installs(block.code) if block.lang == "bash" else block.code
            argv = ["bash", "-euo", "pipefail", "-c", code] if block.lang == "bash" else [sys.executable, "-c", code]
            result = subprocess.run(argv, cwd=self.root, env=self.env, capture_output=True, text=True)
            output = f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
            assert result.returncode == 0, f"{block.id} failed:\n{code}\n{output}"
        return result


@pytest.fixture(scope="module")
def runner(readme_runner) -> Runner:
    # conftest's session runner: its quickstart block (the session's one quickstart bake) has already run
    return readme_runner


@pytest.mark.parametrize(
    "index",
    [pytest.param(i, id=b.id, marks=[pytest.mark.slow] if b.page != "README.md" else []) for i, b in enumerate(ALL)],
)
def test_block_runs_as_written(runner, index):
    block = ALL[index]
    if block.skip:
        pytest.skip(f"{block.id} is marked not to run: {block.skip}")
    runner.run_through(index)


def test_python_api_block_writes_under_out_and_leaves_the_root_clean(runner):
    api = next(i for i, b in enumerate(ALL) if b.page == "README.md" and b.lang == "python")
    result = runner.run_through(api) or subprocess.CompletedProcess([], 0, "", "")
    assert (runner.root / "out" / "cheerful-api" / "bake.json").is_file()
    assert (runner.root / "out" / "cheerful.safetensors").is_file()
    status = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True).stdout.split()
    stray = [p.name for p in runner.root.iterdir() if p.name not in {s.split("/")[0] for s in status} | {"out"}]
    assert stray == [], f"the README's blocks left files outside out/: {stray} ({result.stdout[-200:]})"


def test_quickstart_reproduces_the_readme_figures(runner):
    quickstart = next(i for i, b in enumerate(ALL) if QUICKSTART in b.code)
    runner.run_through(quickstart)
    fresh = figures.record(json.loads((runner.root / "out" / "cheerful" / "bake.json").read_text()))
    recorded = json.loads(figures.FIGURES.read_text())
    ver, want = fresh["verification"], recorded["verification"]
    assert {k: v for k, v in ver.items() if k not in ("max_abs_logit_diff", "steering_effect")} == {
        k: v for k, v in want.items() if k not in ("max_abs_logit_diff", "steering_effect")
    }
    # float32 rounding noise: within the tolerance, and of the recorded order (other CPUs sum in other orders)
    assert ver["max_abs_logit_diff"] < ver["atol"] and ver["max_abs_logit_diff"] < 10 * want["max_abs_logit_diff"]
    assert ver["steering_effect"] == pytest.approx(want["steering_effect"], rel=1e-3)
    assert fresh["vector"] == pytest.approx(recorded["vector"], rel=1e-4)


def test_every_figures_block_is_its_rendering():
    """Every <!-- figures:NAME --> block of README.md, docs/*.md and benchmarks/README.md is NAME's rendering of its
    committed JSON, and every rendering has its block (docs/figures.py)."""
    assert figures.problems() == [], "run python docs/figures.py --render"


def test_figures_problems_name_stale_unknown_unpaired_and_missing_blocks(tmp_path):
    blocks = figures.renderings()
    pages = figures.pages()
    stale = tmp_path / "stale.md"
    stale.write_text("x\n<!-- figures:quickstart -->\nold\n<!-- end figures:quickstart -->\ny\n")
    unknown = tmp_path / "unknown.md"
    unknown.write_text("<!-- figures:nothing -->\n<!-- end figures:nothing -->\n")
    unpaired = tmp_path / "unpaired.md"
    unpaired.write_text("<!-- figures:gguf -->\nno end\n")
    found = figures.problems([*pages, stale, unknown, unpaired])
    assert any("stale.md: figures:quickstart is already shown in README.md" in p for p in found), found
    assert any("stale.md: figures:quickstart is stale" in p for p in found), found
    assert any("unknown.md: figures:nothing is rendered from nothing" in p for p in found), found
    assert any("unpaired.md: figures:gguf has no end marker" in p for p in found), found
    assert figures.problems([p for p in pages if p.name != "gguf.md"]) == [
        "figures:gguf is shown on no page: add its block"
    ]
    # splice puts the rendering between the markers, keeps their indentation and the text around them
    text = "a\n  <!-- figures:gguf -->\n  stale\n  <!-- end figures:gguf -->\nb\n"
    assert (
        figures.splice(text, blocks)
        == f"a\n  <!-- figures:gguf -->\n{blocks['gguf']}\n  <!-- end figures:gguf -->\nb\n"
    )


def test_a_benchmark_run_updates_only_its_sections(tmp_path, monkeypatch):
    """benchmarks/run.py --only NAME rewrites NAME in results.json, with its machine, command, date and load, and
    keeps every other section as it was; its rendering is render_NAME of the measured dict."""
    bench = figures.benchmarks()
    committed = json.loads(bench.RESULTS.read_text())
    results = tmp_path / "results.json"
    results.write_text(json.dumps(committed))
    toy = bench.Section("Toy", lambda args: {"n": 3 if args.quick else 1}, lambda r: f"n is {r['n']}")
    monkeypatch.setitem(bench.SECTIONS, "toy", toy)
    monkeypatch.setattr(bench.common, "machine", lambda cache: {"CPU": "test"})  # no torch process
    argv = ["run.py", "--only", "toy", "--quick", "--results", str(results), "--cache", str(tmp_path / "cache")]
    monkeypatch.setattr(sys, "argv", argv)
    bench.main()
    written = json.loads(results.read_text())
    assert {k: v for k, v in written.items() if k != "toy"} == committed
    entry = written["toy"]
    assert entry["results"] == {"n": 3} and entry["quick"] is True and entry["machine"] == {"CPU": "test"}
    assert entry["command"] == "python benchmarks/run.py " + " ".join(argv[1:]) and "source" not in entry
    assert set(entry["load"]) == {"start", "end"} and entry["minutes"] >= 0
    text = bench.render_section("toy", entry)
    assert text.startswith("### Toy\n") and text.endswith("n is 3") and "**Quick run**" in text
    assert "Transcribed" not in text
    assert all("**Transcribed** from" in bench.render_section(n, e) for n, e in committed.items() if e.get("source"))


def test_readme_fits_on_a_few_screens_and_links_only_to_files_that_exist():
    readme = (ROOT / "README.md").read_text()
    assert readme.count("\n") <= 200
    for page in PAGES:
        for target in re.findall(r"\]\(([^)#:]+)(?:#[^)]*)?\)", page.read_text()):
            assert (page.parent / target).exists(), f"{page.name} links to {target}, which does not exist"
