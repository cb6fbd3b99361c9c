"""Progress bars that stay readable in logs."""

import sys
from collections.abc import Iterable

from tqdm import tqdm

# Outside a terminal (DVC logs, CI) every redraw is a new line: one every 10 s is enough there.
TERMINAL_INTERVAL_S = 0.1
LOG_INTERVAL_S = 10.0


def progress_bar(iterable: Iterable | None = None, enabled: bool = True, **options) -> tqdm:
    """A tqdm bar, redrawn at most every LOG_INTERVAL_S seconds when stderr is not a terminal.

    Update its postfix with `set_postfix(..., refresh=False)`, so that it shows at the next
    redraw instead of forcing one."""
    interval = TERMINAL_INTERVAL_S if sys.stderr.isatty() else LOG_INTERVAL_S
    return tqdm(iterable, mininterval=interval, disable=not enabled, **options)
