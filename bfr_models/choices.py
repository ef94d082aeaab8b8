"""The named options a user picks on the command line, free of torch: the parser lists them without
importing the models (``bfr-curate --help`` stays fast). The modules that use them import them from here."""

import os
from pathlib import Path


PUBLISHED_CATALOGS = Path(__file__).resolve().parents[1] / "catalogs"  # the ones this repository ships


def catalogs_dir() -> Path:
    """The YAML catalogs (model cards, presets, recipes, thresholds): ``BFR_CURATE_CATALOGS`` or the repo's."""
    env = os.environ.get("BFR_CURATE_CATALOGS")
    if env:
        return Path(env).expanduser()
    return PUBLISHED_CATALOGS


def list_presets() -> list[str]:
    """The degradation presets: one YAML each in ``catalogs/presets``."""
    folder = catalogs_dir() / "presets"
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


# bfr_models.diffusion.schedule: the reverse step's variance of a prior
VARIANCE_TYPES = ("fixed_small", "fixed_large", "learned_range")

# bfr_models.pseudo_targets: the methods, what to do with off-size inputs, and each method's respaced steps
PSEUDO_TARGET_METHODS = ("dr2", "lowfreq", "polish", "difbfsr")
PSEUDO_TARGET_RESIZE_MODES = ("input", "prior", "refuse")
AUTO_METRICS = ("niqe", "musiq")  # what --auto may rank candidates by
DEFAULT_RESPACE = {"dr2": 100, "lowfreq": 250, "polish": 1000, "difbfsr": 250}  # polish: no respacing (DiffBFR)

# IDM (bfr_models.idm): the sampler's variance, and which images the training pairs degrade
IDM_VARIANCES = ("posterior", "large")
IDM_DEGRADE_SOURCES = ("original", "cleaned")

# bfr_models.metrics.suite: the metrics by what they compare, and score's defaults
NO_REFERENCE = ("niqe", "musiq", "nrqm", "pi")
FULL_REFERENCE = ("lpips", "psnr", "ssim")
SET_LEVEL = ("fid",)
KNOWN_METRICS = NO_REFERENCE + FULL_REFERENCE + SET_LEVEL
DEFAULT_METRICS = "niqe,psnr,ssim"  # images with a reference: --reference, or a manifest whose rows have parents
NO_REFERENCE_DEFAULT = ("niqe", "musiq")  # images without one (musiq when its weights are in the model cache)
