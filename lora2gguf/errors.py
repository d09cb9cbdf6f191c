"""The one error type users see: a single line naming the file, the problem and the way out. And how
signals become exceptions that take the clean-up paths (temp outputs removed)."""

import contextlib
import signal
import threading


class Lora2GGUFError(Exception):
    """Bad input or a refused request. The CLI prints `error: <message>` and exits 2."""

    exit_code = 2


class Terminated(KeyboardInterrupt):
    """SIGTERM / SIGHUP, raised in the main thread by the CLI's handler. A KeyboardInterrupt, so that every
    clean-up path Ctrl-C takes (temp outputs removed, nothing half-written left behind) runs for it too."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum


@contextlib.contextmanager
def signals_deferred():
    """Hold SIGINT/SIGTERM/SIGHUP while a long C call runs (llama.cpp's quantizer). Python runs signal
    handlers between bytecodes, so during the call a handler runs inside a ctypes callback (a log line),
    where the exception it raises is printed and dropped by ctypes, and the call carries on to the end.
    Here they are recorded instead and re-raised when the call returns, to whatever handler was there."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    got: list[int] = []
    held = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    old = {s: signal.signal(s, lambda signum, frame: got.append(signum)) for s in held}
    try:
        yield
    finally:
        for s, h in old.items():
            signal.signal(s, h)
        if got:
            signal.raise_signal(got[0])
