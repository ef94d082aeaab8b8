"""Python's garbage collector while the console command starts.

Importing torch, Prefect and a stage makes millions of objects that live as long as the process, and each full
collection walks all of them: importing ``flows.degrade`` ran 5 full collections here, 0.47 s of its 2.5 s, and
every later full collection during the run cost ~0.1 s more. So a flow command pauses the collector before it
imports its stage (:func:`pause_collection`) and, once imported, moves every object into the permanent
generation and collects as usual (:func:`freeze_imports`): later collections look only at what the run makes.
Only the console command does this; a Python caller keeps its own collector settings."""

from __future__ import annotations

import gc

_paused = False  # by pause_collection, not by someone else


def pause_collection() -> None:
    """No collection until :func:`freeze_imports` (the imports' cyclic garbage, a few objects, is kept)."""
    global _paused
    if gc.isenabled():
        gc.disable()
        _paused = True


def freeze_imports() -> None:
    """What exists now is permanent; collect as usual from here. Does nothing unless this process paused."""
    global _paused
    if _paused:
        _paused = False
        gc.freeze()
        gc.enable()
