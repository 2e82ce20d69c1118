"""What every ``dynconv`` command shares: its exit statuses, one-line errors, plain-text ``--help``
and the progress display. Imports nothing of dynconv, so any tool may use it.
"""
from __future__ import annotations

import argparse
import re
import sys
import time

EXIT_OK = 0
EXIT_FAILED = 1  # it ran, and something failed (a kernel that does not compile, a write that broke)
EXIT_USAGE = 2  # bad arguments (argparse's own status) or a refusal before any work started
EXIT_NO_GPU = 3  # the command needs a CUDA GPU and found none: nothing was measured or tuned
EXIT_STATUSES = ("exit status: 0 done; 1 failed; 2 bad arguments, or refused before starting; "
                 "3 no CUDA GPU here (or TRITON_INTERPRET=1), so nothing was measured or tuned. "
                 "plot needs no GPU; bench without one still re-draws the plots, then exits 3.")


def fail(prog: str, message: str, status: int = EXIT_USAGE) -> int:
    """Print ``prog: message`` as one line on stderr and return ``status`` (for ``return fail(...)``)."""
    first = (str(message).strip().splitlines() or ["failed"])[0]
    print(f"{prog}: {first}", file=sys.stderr)
    return status


_ROLE = re.compile(r":[a-z]+:`(~?)([^`]+)`")


def plain(text: str) -> str:
    """reST docstring text as plain text for a terminal: roles, literals and emphasis unwrapped,
    ``::`` to ``:``."""
    text = _ROLE.sub(lambda m: m.group(2).rsplit(".", 1)[-1] if m.group(1) else m.group(2), text)
    text = re.sub(r"``([^`]+)``", r"\1", text)
    text = re.sub(r"(?<![\w*])\*\*([^*]+)\*\*(?![\w*])", r"\1", text)
    text = re.sub(r"(?<![\w*])\*([^*\s][^*]*)\*(?![\w*])", r"\1", text)
    return re.sub(r"::(\s*)$", r":\1", text, flags=re.M)


def command_parser(prog: str, doc: str | None, epilog_paragraphs: bool = True) -> argparse.ArgumentParser:
    """An ArgumentParser whose description is the docstring's first paragraph and whose epilog is
    the rest (when ``epilog_paragraphs``) plus :data:`EXIT_STATUSES`, all as plain text."""
    parts = plain(doc or "").strip().split("\n\n")
    epilog = "\n\n".join(parts[1:]) if epilog_paragraphs else ""
    return argparse.ArgumentParser(prog=prog, description=parts[0],
                                   epilog=(epilog + "\n\n" if epilog else "") + EXIT_STATUSES,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)


def add_quiet(p: argparse.ArgumentParser) -> None:
    p.add_argument("--quiet", action="store_true", help="no progress display (it is off anyway when stderr is not a terminal)")


def clock(seconds: float) -> str:
    seconds = int(seconds)
    return f"{seconds // 60}:{seconds % 60:02d}"


class Progress:
    """A one-line progress bar on stderr, redrawn in place; silent when ``quiet`` or when stderr
    is not a terminal (logs and pipes get only the command's own output)."""

    def __init__(self, total: int, title: str, quiet: bool = False, stream=None):
        self.total, self.title, self.done = max(total, 1), title, 0
        self.stream = stream or sys.stderr
        self.active = not quiet and getattr(self.stream, "isatty", lambda: False)()
        self.start = time.monotonic()

    def update(self, note: str = "", n: int = 1) -> None:
        self.done += n
        if not self.active:
            return
        elapsed = time.monotonic() - self.start
        left = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        filled = int(30 * min(self.done, self.total) / self.total)
        line = (f"{self.title} [{'#' * filled}{'.' * (30 - filled)}] {self.done}/{self.total} "
                f"{clock(elapsed)} elapsed, ~{clock(left)} left  {note[:30]}")
        # Cleared line, cursor back at its start: the command's own output overwrites the bar.
        self.stream.write("\r\033[K" + line + ("\n" if self.done >= self.total else "\r"))
        self.stream.flush()

    def close(self) -> None:
        """End the line of a display stopped before its total (an error, a skipped item)."""
        if self.active and 0 < self.done < self.total:
            self.stream.write("\n")
            self.stream.flush()
