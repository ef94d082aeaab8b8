"""The console's account of a stage's verdicts (``clean``'s acceptance, the pseudo-target gate): how many rows
each check rejected, which checks were not made and why, and how many images a model was run on by resizing."""

from __future__ import annotations

from collections import Counter
from typing import Iterable


def count_checks(failed: Iterable[Iterable[str]]) -> dict[str, int]:
    """Rows rejected per check (a row failing two checks counts for both), commonest first."""
    counts = Counter(check for checks in failed for check in dict.fromkeys(checks))
    return dict(counts.most_common())


def _why(record: dict) -> str:
    if record.get("command"):  # a metric whose weights are missing: the command that fetches them
        return f"weights missing: {record['command']}"
    return record.get("reason", "not computed")


def rejected_text(rejected: dict[str, int]) -> str:
    """``rejected by: niqe 6, colour 3``."""
    return "rejected by: " + (", ".join(f"{k} {v}" for k, v in rejected.items()) if rejected else "no check")


def not_checked_text(not_checked: list[dict], label: str = "not checked") -> str:
    """``not checked: musiq (weights missing: bfr-curate models pull musiq_koniq), ...``."""
    return f"{label}: " + ", ".join(f"{r['metric']} ({_why(r)})" for r in not_checked)


def checks_line(rejected: dict[str, int], not_checked: list[dict]) -> str:
    """:func:`rejected_text`, then :func:`not_checked_text` when a check was not made."""
    return "; ".join([rejected_text(rejected)] + ([not_checked_text(not_checked)] if not_checked else []))


def resized_note(uri: str, model: str, how: str = "and back (MATLAB bicubic)") -> str | None:
    """The console line saying how many rows a model trained at one size was applied to by resizing (columns
    ``model_px`` and ``resized``); None when none was."""
    from bfr_models import manifest

    frame = manifest.read_manifest(uri)
    resized = frame[frame["resized"].fillna(False).astype(bool)] if "resized" in frame else frame.iloc[:0]
    if resized.empty:
        return None
    px = int(resized["model_px"].iloc[0])
    return (f"  note:     the {model} was trained at {px}x{px} px: {len(resized)} of {len(frame)} images of other "
            f"sizes were resized to {px} px for it {how}; columns model_px, resized")
