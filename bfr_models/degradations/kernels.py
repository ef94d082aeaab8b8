"""Blur kernels of BasicSR's ``basicsr/data/degradations.py``, reimplemented (numpy).

Every kernel is a function of the quadratic form ``q(p) = p^T Sigma^-1 p`` over a
``kernel_size`` x ``kernel_size`` grid of integer offsets ``p = (x, y)`` centred on the middle
pixel (x = column offset, y = row offset), with ``Sigma = R diag(sigma_x^2, sigma_y^2) R^T`` and
``R`` the rotation by ``rotation`` radians. Every kernel is normalised to sum to 1.

  gaussian:             exp(-q / 2)
  generalized gaussian: exp(-q^beta / 2)     beta = 1 is the Gaussian (BasicSR's parametrisation:
                                             beta acts on the *squared* distance q)
  plateau:              1 / (1 + q^beta)

The "iso" variant of each has ``sigma_y = sigma_x`` and ``rotation = 0``; "aniso" draws both.
Randomness comes only from the ``numpy.random.Generator`` passed in.
"""

from __future__ import annotations

import math
from functools import lru_cache
from typing import Sequence

import numpy as np

KERNEL_TYPES = ("iso", "aniso", "generalized_iso", "generalized_aniso", "plateau_iso", "plateau_aniso")


def sigma_matrix(sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    """The 2x2 covariance R diag(sigma_x^2, sigma_y^2) R^T in (x, y) coordinates."""
    c, s = math.cos(rotation), math.sin(rotation)
    r = np.array([[c, -s], [s, c]])
    return r @ np.diag([sigma_x**2, sigma_y**2]) @ r.T


@lru_cache(maxsize=32)
def _offsets(kernel_size: int) -> tuple[np.ndarray, np.ndarray]:
    """The (y, x) offset grids of a kernel, read-only: ``np.mgrid`` costs more than the kernel's arithmetic."""
    half = kernel_size // 2
    grids = np.mgrid[-half : half + 1, -half : half + 1].astype(np.float64)
    grids.flags.writeable = False
    return grids[0], grids[1]


def _quadratic_form(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    if kernel_size < 1 or kernel_size % 2 != 1:
        raise ValueError(f"kernel_size must be a positive odd number, got {kernel_size}")
    y, x = _offsets(kernel_size)
    inv = np.linalg.inv(sigma_matrix(sigma_x, sigma_y, rotation))
    return inv[0, 0] * x * x + (inv[0, 1] + inv[1, 0]) * x * y + inv[1, 1] * y * y


def _normalised(kernel: np.ndarray) -> np.ndarray:
    return kernel / kernel.sum()


def gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float) -> np.ndarray:
    return _normalised(np.exp(-0.5 * _quadratic_form(kernel_size, sigma_x, sigma_y, rotation)))


def generalized_gaussian_kernel(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float,
                                beta: float) -> np.ndarray:
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, rotation)
    return _normalised(np.exp(-0.5 * np.power(q, beta)))


def plateau_kernel(kernel_size: int, sigma_x: float, sigma_y: float, rotation: float, beta: float) -> np.ndarray:
    q = _quadratic_form(kernel_size, sigma_x, sigma_y, rotation)
    return _normalised(1.0 / (np.power(q, beta) + 1.0))


def kernel_from_params(kernel_type: str, kernel_size: int, sigma_x: float, sigma_y: float, rotation: float,
                       beta: float | None = None) -> np.ndarray:
    """The kernel of a :func:`random_kernel_params` draw."""
    if kernel_type not in KERNEL_TYPES:
        raise ValueError(f"unknown kernel type {kernel_type!r} (known: {', '.join(KERNEL_TYPES)})")
    if kernel_type in ("iso", "aniso"):
        return gaussian_kernel(kernel_size, sigma_x, sigma_y, rotation)
    if beta is None:
        raise ValueError(f"kernel type {kernel_type!r} needs beta")
    if kernel_type.startswith("generalized"):
        return generalized_gaussian_kernel(kernel_size, sigma_x, sigma_y, rotation, beta)
    return plateau_kernel(kernel_size, sigma_x, sigma_y, rotation, beta)


def _sample_beta(rng: np.random.Generator, beta_range: Sequence[float]) -> float:
    # BasicSR: half the draws below 1, half above (assumes beta_range[0] <= 1 <= beta_range[1]).
    if rng.uniform() < 0.5:
        return float(rng.uniform(beta_range[0], 1.0))
    return float(rng.uniform(1.0, beta_range[1]))


def random_kernel_params(
    rng: np.random.Generator,
    kernel_list: Sequence[str],
    kernel_prob: Sequence[float],
    kernel_size: int = 21,
    sigma_x_range: Sequence[float] = (0.6, 5.0),
    sigma_y_range: Sequence[float] = (0.6, 5.0),
    rotation_range: Sequence[float] = (-math.pi, math.pi),
    betag_range: Sequence[float] = (0.5, 8.0),
    betap_range: Sequence[float] = (0.5, 8.0),
) -> dict:
    """Draw a kernel type from ``kernel_list`` with ``kernel_prob``, then its parameters, in
    BasicSR's order (type, sigma_x, [sigma_y, rotation], [beta]). Defaults are BasicSR's.

    Returns ``kernel_type``, ``kernel_size``, ``sigma_x``, ``sigma_y``, ``rotation`` and ``beta``
    (None for Gaussian kernels) as plain Python values: ``kernel_from_params(**params)`` builds the kernel.
    """
    unknown = [t for t in kernel_list if t not in KERNEL_TYPES]
    if unknown or len(kernel_list) != len(kernel_prob) or not kernel_list:
        raise ValueError(f"kernel_list must name known types ({', '.join(KERNEL_TYPES)}) with one "
                         f"probability each, got {list(kernel_list)} / {list(kernel_prob)}")
    prob = np.asarray(kernel_prob, dtype=np.float64)
    kernel_type = str(kernel_list[rng.choice(len(kernel_list), p=prob / prob.sum())])
    sigma_x = float(rng.uniform(*sigma_x_range))
    if kernel_type.endswith("aniso"):
        sigma_y = float(rng.uniform(*sigma_y_range))
        rotation = float(rng.uniform(*rotation_range))
    else:
        sigma_y, rotation = sigma_x, 0.0
    beta = None
    if kernel_type.startswith("generalized"):
        beta = _sample_beta(rng, betag_range)
    elif kernel_type.startswith("plateau"):
        beta = _sample_beta(rng, betap_range)
    return {"kernel_type": kernel_type, "kernel_size": int(kernel_size), "sigma_x": sigma_x,
            "sigma_y": sigma_y, "rotation": rotation, "beta": beta}

