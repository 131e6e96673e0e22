"""``messagevault serve`` on a leash: it stops when the process that started it goes away.

``python -m messagevault.leash [--remove FOLDER] serve ARGS...`` runs
``messagevault serve ARGS...`` with a watch on its standard input, a pipe
whose only writer is the parent. However the parent ends (SIGKILL, a crash,
an unhandled SIGTERM), the kernel closes that pipe: the watch reads end of
file, stops the server as SIGTERM would (gracefully), and, after the server
is down, removes ``FOLDER`` (the parent's temporary folder, which nobody
else is left to remove). A parent that stops the server itself keeps the
pipe open until then, so the folder is its own to remove.

It sits beside the CLI, whose ``serve`` it runs, not in the stress package
that starts it: nothing below the CLI imports the CLI.

A pipe rather than Linux's PR_SET_PDEATHSIG: that signal fires when the
parent's *thread* ends, not the process, and setting it in the child
before exec needs ``preexec_fn``, unsafe in a parent with threads.
"""

from __future__ import annotations

import os
import shutil
import signal
import sys
import threading
from typing import Final

GRACE: Final = 60.0  # seconds an orphaned server gets to stop before it exits regardless


def _watch(parent_gone: threading.Event) -> None:
    try:
        while os.read(sys.stdin.fileno(), 4096):
            pass
    except OSError:
        pass
    parent_gone.set()
    os.kill(os.getpid(), signal.SIGTERM)
    # A graceful stop that hangs must not leave an orphan holding the port.
    threading.Event().wait(GRACE)
    os._exit(1)


def main(arguments: list[str]) -> None:
    remove = None
    if arguments[:1] == ["--remove"]:
        remove, arguments = arguments[1], arguments[2:]
    parent_gone = threading.Event()
    threading.Thread(
        target=_watch, args=(parent_gone,), name="messagevault-leash", daemon=True
    ).start()
    from messagevault.cli import main as cli

    try:
        cli.main(arguments, prog_name="messagevault")
    finally:
        if parent_gone.is_set() and remove is not None:
            shutil.rmtree(remove, ignore_errors=True)


if __name__ == "__main__":
    main(sys.argv[1:])
