"""IDM (Zhao et al., ICCV 2023): a conditional x0-prediction diffusion restorer and the dataset cleaning built on it.

- :mod:`.model`      the network (a diffusers UNet2DModel with the degraded image concatenated as condition),
                     its config and its folder format;
- :mod:`.sampler`    the few-step DDPM sampler of spec §2.6 (intrinsic iterative refinement);
- :mod:`.train`      one intrinsic training round on (degrade(source), target) pairs (Eq. 7), resumable;
- :mod:`.acceptance` the per-image acceptance test of a cleaned image (spec §9.4).

No Prefect here (see ``flows/clean.py``).
"""

from bfr_models.idm.acceptance import AcceptanceConfig, SetCalibration, calibrate, judge, load_acceptance
from bfr_models.idm.model import IDMConfig, IDMError, IDMModel, idm_unet, load_idm, save_idm
from bfr_models.idm.sampler import idm_sample, idm_timesteps
from bfr_models.idm.train import IDMTrainConfig, train_idm

__all__ = ["AcceptanceConfig", "IDMConfig", "IDMError", "IDMModel", "IDMTrainConfig", "SetCalibration", "calibrate",
           "idm_sample", "idm_timesteps", "idm_unet", "judge", "load_acceptance", "load_idm", "save_idm", "train_idm"]
