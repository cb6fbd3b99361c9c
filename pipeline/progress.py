"""Progress bars that stay readable in logs."""

import sys
from collections.abc import Iterable

from tqdm import tqdm

# Outside a terminal (DVC logs, CI) every redraw is a new line: one every 10 s is enough there.
TERMINAL_INTERVAL_S = 0.1
LOG_INTERVAL_S = 10.0


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar, redrawn at most every LOG_INTERVAL_S seconds when stderr is not a terminal.
    There, a transient bar (`leave=False`, an epoch's) appears only once it has run that long:
    a log keeps the lines that follow it, not a remnant of each short bar.

    Update its postfix with `set_postfix(..., refresh=False)`, so that it shows at the next
    redraw instead of forcing one."""
    terminal = sys.stderr.isatty()
    interval = TERMINAL_INTERVAL_S if terminal else LOG_INTERVAL_S
    if not terminal and not options.get("leave", True):
        options["delay"] = LOG_INTERVAL_S
    return tqdm(iterable, mininterval=interval, disable=not enabled, **options)
