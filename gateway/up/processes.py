"""Child processes of `gptq-gateway up`: started in their own sessions, stopped in order.

Children get their own process group so that a Ctrl-C in the terminal reaches `up` alone, which
then stops them in order, last started first (see stop_all). On
Linux each child also asks the kernel for SIGTERM should `up` die without cleaning up.
"""

from __future__ import annotations

import contextlib
import ctypes
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

_PR_SET_PDEATHSIG = 1


def cli_command(*args: str) -> list[str]:
    """`python -m gateway.cli ARGS` for a child process, importing what this process imported.

    Plain `-m` puts the working directory first on sys.path: run from a source checkout, the child
    would import the checkout (without its built extension) instead of the installed package.
    `-P` (Python 3.11+) leaves the working directory out.
    """
    safe_path = ["-P"] if sys.version_info >= (3, 11) else []
    return [sys.executable, *safe_path, "-m", "gateway.cli", *args]


def _die_with_parent() -> None:  # runs in the child between fork and exec
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError):
            ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


@dataclass
class Child:
    name: str
    process: subprocess.Popen[bytes]

    def exited(self) -> int | None:
        return self.process.poll()


class Supervisor:
    """Starts children, and stops them all (reaped, last started first) exactly once."""

    def __init__(self) -> None:
        self.children: list[Child] = []
        self.stop_requested = threading.Event()
        self.signal_name: str | None = None

    def start(
        self, name: str, command: Sequence[str], env: Mapping[str, str] | None = None
    ) -> Child:
        process = subprocess.Popen(
            list(command), env=env, start_new_session=True, preexec_fn=_die_with_parent
        )
        child = Child(name, process)
        self.children.append(child)
        return child

    def install_signal_handlers(self, also: Callable[[int], None] | None = None) -> None:
        """SIGINT and SIGTERM set `stop_requested` (and call `also`) instead of raising."""

        def handle(signum: int, frame: object) -> None:
            self.signal_name = signal.Signals(signum).name
            self.stop_requested.set()
            if also is not None:
                also(signum)

        signal.signal(signal.SIGINT, handle)
        signal.signal(signal.SIGTERM, handle)

    def first_exited(self) -> Child | None:
        for child in self.children:
            if child.exited() is not None:
                return child
        return None

    def wait(self, poll_s: float = 0.2) -> Child | None:
        """Until a stop is requested (None) or a child exits (that child)."""
        while not self.stop_requested.is_set():
            exited = self.first_exited()
            if exited is not None:
                return exited
            self.stop_requested.wait(poll_s)
        return None

    def stop_all(
        self, timeout_s: float = 60.0, say: Callable[[str], None] | None = None
    ) -> dict[str, int]:
        """SIGTERM each child, last started first, waiting for each (telling `say` what it waits
        for); SIGKILL after `timeout_s`. Returns every child's exit code.

        `up` starts the shim first, so the gRPC server stops first: it drains, and a stream it
        cuts ends with a final chunk that the shim, still up, turns into an SSE error event (new
        calls meanwhile get 503). The shim then has no open stream left and stops at once."""
        codes: dict[str, int] = {}
        for child in reversed(self.children):
            process = child.process
            if process.poll() is None:
                process.send_signal(signal.SIGTERM)
                if say is not None:
                    say(f"waiting for `{child.name}` (pid {process.pid}) to stop")
                deadline = time.monotonic() + timeout_s
                while process.poll() is None and time.monotonic() < deadline:
                    time.sleep(0.05)
                if process.poll() is None:
                    process.kill()
            codes[child.name] = process.wait()
        self.children.clear()
        return codes
