"""The one error type users see: a single line naming the file, the problem and the way out."""


class Lora2GGUFError(Exception):
    """Bad input or a refused request. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2
