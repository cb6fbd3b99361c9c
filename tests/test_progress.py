"""Progress bars in logs: a redraw is a new line there, so they must be rare."""

import time

from pipeline.progress import progress_bar


def test_a_bar_outside_a_terminal_redraws_rarely_but_ends_with_its_postfix(capsys):
    with progress_bar(range(500), desc="train") as bar:
        for step in bar:
            time.sleep(0.002)  # a second in all: ten redraws at a terminal's rate
            bar.set_postfix({"loss": f"{1 / (step + 1):.4f}"}, refresh=False)
    log = capsys.readouterr().err
    redraws = log.count("\r")
    assert 1 <= redraws <= 3, log
    assert "500/500" in log and "loss=0.0020" in log


def test_a_disabled_bar_writes_nothing(capsys):
    with progress_bar(range(10), enabled=False) as bar:
        assert list(bar) == list(range(10))
    assert capsys.readouterr().err == ""


def test_a_short_transient_bar_leaves_nothing_in_a_log(capsys):
    """An epoch's bar outside a terminal: its one-line summary follows, with no bar remnant."""
    with progress_bar(range(50), desc="epoch 1/3", leave=False) as bar:
        for _ in bar:
            time.sleep(0.001)
    assert capsys.readouterr().err == ""
