"""Progress and Cancel for the pack's long-running nodes, through the host's own functions.

Cancel is checked with comfy.model_management.throw_exception_if_processing_interrupted() at every step (token,
UNet call, DiffRIR tile, downloaded chunk), not through the progress bar's hook: ComfyUI 0.33's
ProgressBar.update_absolute (comfy/utils.py) calls its hook at most every 0.1 s and 0.5 %, so an interrupt that
rode on the hook would arrive late, while 0.3.64's hook checked it on every update. The bar still shows the
progress; the host decides how often it reaches the browser.
"""
from __future__ import annotations

from typing import Callable, Optional

import comfy.model_management as mm
import comfy.utils


def step_reporter(total: int, node_id: Optional[str] = None) -> Callable[[int, Optional[int]], None]:
    """report(done, total=None) for a node's steps: raises the host's InterruptProcessingException when the user
    cancelled, else moves the node's progress bar to `done` (of `total`, which a step may change)."""
    bar = comfy.utils.ProgressBar(max(int(total), 1), node_id=node_id)

    def report(done: int, new_total: Optional[int] = None) -> None:
        mm.throw_exception_if_processing_interrupted()
        bar.update_absolute(done, None if new_total is None else max(int(new_total), 1))

    return report
