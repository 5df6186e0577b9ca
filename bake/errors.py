"""The exception types for bad input: the CLI prints each as a single line, never a traceback."""

from pathlib import Path


class BakeError(Exception):
    """A problem with what the user gave us, phrased as 'what is wrong: how to fix it'."""


class OutputExists(BakeError):
    """An output that is already there: the one refusal, worded ``force=True`` by the library, ``--force`` by
    the CLI."""

    def __init__(self, target: Path, what: str = "already exists") -> None:
        self.target, self.what = Path(target), what
        super().__init__(self.hint("force=True"))

    def hint(self, flag: str) -> str:
        return f"output {str(self.target)!r} {self.what}: choose another path or pass {flag} to replace it"
