"""Thresholds and knobs kept in YAML files (``catalogs/``) and read into frozen dataclasses."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

import yaml


def load_dataclass_yaml(cls, path: Path, what: str, **overrides):
    """``cls(**mapping)`` from the YAML mapping at ``path``, then the ``overrides`` that are not None.

    An unreadable file, a non-mapping or an unknown key is a one-line ``ValueError`` naming ``what``.
    """
    try:
        raw = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ValueError(f"{what} {path}: cannot read it: {' '.join(str(e).split())}") from None
    known = {f.name for f in fields(cls)}
    if not isinstance(raw, dict) or set(raw) - known:
        unknown = sorted(set(raw) - known) if isinstance(raw, dict) else ["(not a mapping)"]
        raise ValueError(f"{what} {path}: unknown field(s) {', '.join(unknown)} (expected: {', '.join(sorted(known))})")
    return cls(**{**raw, **{k: v for k, v in overrides.items() if v is not None}})
