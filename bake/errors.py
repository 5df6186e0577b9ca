"""The one exception type for bad input: the CLI prints it as a single line, never a traceback."""


class BakeError(Exception):
    """A problem with what the user gave us, phrased as 'what is wrong: how to fix it'."""
