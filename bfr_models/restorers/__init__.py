"""Restorers R for y0 = R(y): ``none``, ``bicubic``, our :class:`SmallRestorer` / :class:`SwinIRRestorer`
checkpoints, or any spandrel model.

No Prefect here. See :mod:`bfr_models.restorers.registry` for what a spec may be and what a Restorer does.
"""

from bfr_models.restorers.checkpoint import FORMAT, load_restorer_module, restorer_bytes, save_restorer
from bfr_models.restorers.errors import RestorerError
from bfr_models.restorers.registry import (BUILTINS, CheckpointModel, Restorer, SpandrelModel, list_restorers,
                                           load_restorer, spandrel_architectures)
from bfr_models.restorers.small import SmallRestorer
from bfr_models.restorers.swinir import SwinIRRestorer

__all__ = [
    "BUILTINS",
    "FORMAT",
    "CheckpointModel",
    "Restorer",
    "RestorerError",
    "SmallRestorer",
    "SpandrelModel",
    "SwinIRRestorer",
    "list_restorers",
    "load_restorer",
    "load_restorer_module",
    "restorer_bytes",
    "save_restorer",
    "spandrel_architectures",
]
