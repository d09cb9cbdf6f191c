"""The one error type users see: a single line naming the file, the problem and the way out. And how
signals become exceptions that take the clean-up paths (temp outputs removed)."""


class Lora2GGUFError(Exception):
    """Bad input or a refused request. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised in the main thread by the CLI's handler. A KeyboardInterrupt, so that every
    clean-up path Ctrl-C takes (temp outputs removed, nothing half-written left behind) runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum
