"""Restorers R for y0 = R(y): ``none``, ``bicubic``, our :class:`SmallRestorer` checkpoints, or any spandrel model.

No Prefect here. See :mod:`bfr_models.restorers.registry` for what a spec may be and what a Restorer does.
"""

from bfr_models.restorers.checkpoint import (FORMAT, load_small_restorer, save_small_restorer,
                                             small_restorer_bytes)
from bfr_models.restorers.errors import RestorerError
from bfr_models.restorers.registry import (BUILTINS, Restorer, SmallRestorerModel, SpandrelModel, list_restorers,
                                           load_restorer, spandrel_architectures)
from bfr_models.restorers.small import SmallRestorer

__all__ = [
    "BUILTINS",
    "FORMAT",
    "Restorer",
    "RestorerError",
    "SmallRestorer",
    "SmallRestorerModel",
    "SpandrelModel",
    "list_restorers",
    "load_restorer",
    "load_small_restorer",
    "save_small_restorer",
    "small_restorer_bytes",
    "spandrel_architectures",
]
