"""Image-quality metrics, plain functions on tensors (no Prefect).

- ``niqe``     NIQE, conventions ``pyiqa`` (published BFR tables) and ``matlab`` (official release);
- ``fullref``  PSNR and SSIM (BasicSR convention, RGB or BT.601 Y, optional border crop);
- ``fid``, ``lpips_metric``, ``musiq``  the learned metrics (weights from model cards);
- ``suite``    which metrics a score run computes, and their recorded conventions.

Import the function from its module, e.g. ``from bfr_models.metrics.niqe import niqe``.
"""
