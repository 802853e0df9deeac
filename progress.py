"""How a long step reports its progress: a tqdm bar on a terminal, one plain line per interval in a
log file or CI, nothing on the non-master ranks of a distributed run.

``bar(iterable=None, total=None, desc=..., master=None, **tqdm_kwargs)`` returns a ``tqdm`` (use it
exactly like one: iterate it, ``update``, ``set_postfix``, ``close``):
* on a terminal (stderr is a TTY): tqdm itself, unchanged;
* otherwise: ``LineProgress``, the same counters printed as whole lines ("desc: 40%| 240/600
  [01:10<01:45, 3.4it/s, loss=0.71]") on stderr at most every ``LOG_INTERVAL_S`` seconds, plus the
  first and the last, because tqdm's carriage-return redraws become one unreadable line in a file;
* ``master=False``: disabled; ``master=None`` (the default) means "rank 0 or not distributed",
  read from torchrun's ``RANK`` variable, so every process of a torchrun job can call ``bar``.

References: tqdm's own ``disable=None`` (off when not a TTY) is the idea; it drops the progress
entirely, and a CI log of a 15-minute step then shows nothing for 15 minutes.
"""
from __future__ import annotations

import os
import sys
import time

from tqdm import tqdm

LOG_INTERVAL_S = 30.0  # a line every 30 s: a 15-minute step writes ~30 lines; chosen here


class LineProgress(tqdm):
    """tqdm that prints a refresh as its own line, at most every ``mininterval`` seconds (tqdm's
    own throttle does not cover ``set_postfix``), plus the first and the last count."""

    printed_n, printed_t = None, 0.0  # count and time of the last line printed

    def display(self, msg=None, pos=None, force: bool = False):
        if msg == "":  # tqdm clearing a bar before close: nothing to clear in a log
            return False
        now = time.monotonic()
        if not force and self.printed_n is not None and now - self.printed_t < self.mininterval:
            return True
        self.fp.write((msg or self.__str__()) + "\n")
        self.fp.flush()
        self.printed_n, self.printed_t = self.n, now
        return True

    def close(self):
        if not self.disable and self.printed_n != self.n:
            self.display(force=True)  # the final count, once
        self.leave = False  # tqdm's own closing would add a blank line (leave) or a carriage return
        super().close()


def bar(iterable=None, total=None, desc: str | None = None, master: bool | None = None,
        **kwargs) -> tqdm:
    """A progress bar for a step longer than a few seconds (module docstring)."""
    if master is None:
        master = os.environ.get("RANK", "0") == "0"
    if not master:
        return tqdm(iterable, total=total, desc=desc, disable=True, **kwargs)
    if sys.stderr.isatty():
        return tqdm(iterable, total=total, desc=desc, **kwargs)
    kwargs.setdefault("mininterval", LOG_INTERVAL_S)
    kwargs.pop("dynamic_ncols", None)  # no terminal to size to
    kwargs["ascii"] = True  # "#" bars: a log file may not be read as UTF-8
    return LineProgress(iterable, total=total, desc=desc, **kwargs)
