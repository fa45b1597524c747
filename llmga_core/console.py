"""Progress for a person at a console: a live tqdm bar in a terminal, plain lines elsewhere (a log, a pipe)."""
from __future__ import annotations


def live_bar_class(stream, live=None):
    """tqdm when `stream` is a terminal (or live=True) and tqdm is installed, else None (print plain lines)."""
    if live is None:
        live = hasattr(stream, "isatty") and stream.isatty()
    if not live:
        return None
    try:
        from tqdm import tqdm
    except ImportError:
        return None
    return tqdm
