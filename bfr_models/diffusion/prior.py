"""A diffusion prior: a diffusers UNet plus its DDPM schedule, stored as a folder anywhere fsspec reaches.

Layout of a prior folder (diffusers' own sub-folder conventions)::

    prior.json                              what it is: resolution, variance type, weights sha256, source
    unet/config.json                        UNet2DModel (or ADMUNet2DModel) config, plain data
    unet/diffusion_pytorch_model.safetensors
    scheduler/scheduler_config.json         diffusers DDPMScheduler config (linear betas, T, epsilon)

``--prior`` names either such a folder (local path or fsspec URL) or a model card whose file is a
guided-diffusion checkpoint (``extra.prior: {from: adm, arch: ffhq256}``), converted when loaded.
Nothing is downloaded here: a card's file must already be in the model cache (``models pull``).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field

import torch
from diffusers import DDPMScheduler, UNet2DModel

from bfr_models import storage
from bfr_models.device import compiled, prepare_unet, unet_call
from bfr_models.diffusion.schedule import VARIANCE_TYPES, DDPMSchedule

PRIOR_FORMAT = "bfr-curate-prior"
PRIOR_VERSION = 1
WEIGHTS = "unet/diffusion_pytorch_model.safetensors"
# diffusers' names for the variance types (DDPMScheduler.variance_type)
_DIFFUSERS_VARIANCE = {"fixed_small": "fixed_small", "fixed_large": "fixed_large", "learned_range": "learned_range"}


class PriorError(ValueError):
    """A prior that cannot be used: missing, corrupt, or not what its metadata says. One line."""


@dataclass
class Prior:
    """An ε-prediction UNet and its full (T-step) schedule, ready to sample with."""

    unet: torch.nn.Module
    schedule: DDPMSchedule
    resolution: int
    variance_type: str
    sha256: str  # of the weights file: the prior's identity in caches and manifests
    uri: str
    meta: dict = field(default_factory=dict)

    @property
    def device(self) -> torch.device:
        return next(self.unet.parameters()).device

    def eps_model(self, dtype: torch.dtype | None = None, compile: bool = False):
        """``f(x_t, t) -> model output`` in float32, as the samplers call it (original timesteps).

        ``dtype=torch.bfloat16`` runs the UNet under autocast (CUDA); the output is cast back.
        ``compile`` runs it through ``torch.compile`` (CUDA). On the CPU the UNet sees one image at a
        time, so an image's bytes do not depend on its batch (:func:`bfr_models.device.unet_call`).
        """
        unet = compiled(self.unet) if compile else self.unet
        return lambda x, t: unet_call(unet, dtype, x, t)

    def describe(self) -> dict:
        """What a manifest records about the prior."""
        return {"uri": self.uri, "sha256": self.sha256, "resolution": self.resolution,
                "variance_type": self.variance_type, "T": self.schedule.num_timesteps,
                "unet_class": type(self.unet).__name__, "source": self.meta.get("source")}


def _unet_class(name: str, where: str) -> type:
    if name == "UNet2DModel":
        return UNet2DModel
    if name == "ADMUNet2DModel":  # converted guided-diffusion checkpoints
        from bfr_models.diffusion.adm import ADMUNet2DModel

        return ADMUNet2DModel
    raise PriorError(f"{where}: UNet class {name!r} is not supported (UNet2DModel, ADMUNet2DModel)")


def scheduler_config(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02,
                     variance_type: str = "fixed_large") -> dict:
    """The papers' schedule as a diffusers DDPMScheduler config: linear betas, ε prediction."""
    sched = DDPMScheduler(num_train_timesteps=T, beta_schedule="linear", beta_start=beta_start,
                          beta_end=beta_end, prediction_type="epsilon",
                          variance_type=_DIFFUSERS_VARIANCE[variance_type], clip_sample=True)
    return dict(sched.config)


def schedule_from_config(config: dict) -> DDPMSchedule:
    if config.get("beta_schedule") != "linear" or config.get("prediction_type", "epsilon") != "epsilon":
        raise PriorError(f"only linear-beta epsilon-prediction priors are supported, got "
                         f"beta_schedule={config.get('beta_schedule')!r} prediction_type={config.get('prediction_type')!r}")
    return DDPMSchedule.linear(int(config["num_train_timesteps"]), float(config["beta_start"]), float(config["beta_end"]))


def save_prior(unet: torch.nn.Module, out: str, *, variance_type: str, T: int = 1000, beta_start: float = 1e-4,
               beta_end: float = 0.02, source: dict | None = None) -> str:
    """Write a prior folder (atomically per file) and return its URI."""
    from safetensors.torch import save

    if variance_type not in VARIANCE_TYPES:
        raise PriorError(f"variance_type must be one of {VARIANCE_TYPES}, got {variance_type!r}")
    out = storage.normalize(out)
    state = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in unet.state_dict().items()}
    weights = save(state)
    unet_config = {k: v for k, v in dict(unet.config).items() if not k.startswith("_")}
    unet_config["_class_name"] = type(unet).__name__
    meta = {
        "format": PRIOR_FORMAT,
        "version": PRIOR_VERSION,
        "resolution": int(unet.config.sample_size if isinstance(unet.config.sample_size, int) else unet.config.sample_size[0]),
        "variance_type": variance_type,
        "unet_class": type(unet).__name__,
        "weights": WEIGHTS,
        "weights_sha256": storage.sha256_hex(weights),
        "source": source or {},
    }
    storage.write_bytes_atomic(storage.join(out, WEIGHTS), weights)
    storage.write_bytes_atomic(storage.join(out, "unet", "config.json"), json.dumps(unet_config, indent=2, default=list).encode())
    storage.write_bytes_atomic(storage.join(out, "scheduler", "scheduler_config.json"),
                               json.dumps(scheduler_config(T, beta_start, beta_end, variance_type), indent=2, default=list).encode())
    storage.write_bytes_atomic(storage.join(out, "prior.json"), json.dumps(meta, indent=2).encode())
    return out


def _read_json(uri: str, what: str) -> dict:
    try:
        return json.loads(storage.read_bytes(uri))
    except FileNotFoundError:
        raise PriorError(f"{what} not found: {uri}") from None
    except (ValueError, UnicodeDecodeError) as e:
        raise PriorError(f"{what} is not valid JSON: {uri} ({e})") from None


def is_prior_folder(uri: str) -> bool:
    return storage.exists(storage.join(uri, "prior.json"))


def read_prior_meta(uri: str) -> dict:
    """``prior.json`` of a folder, validated (format and version)."""
    meta = _read_json(storage.join(uri, "prior.json"), "prior metadata (prior.json)")
    if meta.get("format") != PRIOR_FORMAT:
        raise PriorError(f"{uri}/prior.json is not a {PRIOR_FORMAT} file")
    if meta.get("version") != PRIOR_VERSION:
        raise PriorError(f"{uri}: prior format version {meta.get('version')} is not supported (this build reads {PRIOR_VERSION})")
    return meta


def load_prior(spec: str, device: str | torch.device = "cpu") -> Prior:
    """Load a prior from a folder URI or a model card name. Raises PriorError (or ModelMissingError)."""
    spec = str(spec)
    if "://" not in spec and not storage.exists(spec):
        return _load_card_prior(spec, device)
    uri = storage.normalize(spec)
    if not is_prior_folder(uri):
        raise PriorError(f"not a prior folder (no prior.json): {spec} — convert a checkpoint with "
                         f"`bfr-curate prior convert` or train one with `bfr-curate prior train`")
    meta = read_prior_meta(uri)
    unet_config = _read_json(storage.join(uri, "unet", "config.json"), "UNet config")
    sched_config = _read_json(storage.join(uri, "scheduler", "scheduler_config.json"), "scheduler config")
    try:  # a path from the file: it must stay inside the folder
        weights_uri = storage.confined_join(uri, meta.get("weights", WEIGHTS))
    except ValueError as e:
        raise PriorError(f"{uri}/prior.json: weights: {e}") from None
    try:
        weights = storage.read_bytes(weights_uri)
    except FileNotFoundError:
        raise PriorError(f"prior weights not found: {weights_uri}") from None
    digest = storage.sha256_hex(weights)
    if digest != meta.get("weights_sha256"):
        raise PriorError(f"prior weights {weights_uri} have sha256 {digest}, but prior.json says "
                         f"{meta.get('weights_sha256')}: the file is corrupt or was replaced")
    from bfr_models.weights import safetensors_from_bytes

    try:
        state = safetensors_from_bytes(weights, f"prior weights {weights_uri}")
    except ValueError as e:
        raise PriorError(str(e)) from None
    unet = _build_unet(unet_config, state, uri)
    return Prior(unet=prepare_unet(unet, device), schedule=schedule_from_config(sched_config),
                 resolution=int(meta["resolution"]), variance_type=meta["variance_type"], sha256=digest,
                 uri=uri, meta=meta)


def _build_unet(config: dict, state: dict, where: str) -> torch.nn.Module:
    cls = _unet_class(config.get("_class_name", "UNet2DModel"), where)
    accepted = set(inspect.signature(cls.__init__).parameters)  # ADMUNet2DModel's config also holds UNet2DModel's keys
    unet = cls.from_config({k: v for k, v in config.items() if k in accepted})
    missing, unexpected = unet.load_state_dict(state, strict=False)
    if missing or unexpected:
        raise PriorError(f"{where}: weights do not match the UNet config "
                         f"(missing {sorted(missing)[:3]}, unexpected {sorted(unexpected)[:3]})")
    return unet


def _load_card_prior(name: str, device) -> Prior:
    """A model card naming a guided-diffusion checkpoint: verify its sha256, convert, load."""
    from bfr_models import models, weights

    try:
        card = models.get_card(name)
    except models.ModelCardError:
        raise PriorError(f"prior not found: {name} is neither a prior folder nor a model card name "
                         f"(cards: bfr-curate models list)") from None
    how = card.extra.get("prior")
    if not isinstance(how, dict) or how.get("from") != "adm":
        raise PriorError(f"model card {name} does not describe a diffusion prior (needs extra.prior: {{from: adm, arch: ...}})")
    from bfr_models.diffusion.adm import convert_adm_state_dict

    path = models.require([name])[name]  # raises ModelMissingError / ModelHashError before any work
    state = weights.load_state_dict(str(path), f"prior {name}")
    unet = convert_adm_state_dict(state, how["arch"])
    digest = models.file_sha256(path)
    meta = {"format": PRIOR_FORMAT, "version": PRIOR_VERSION, "source": {"card": name, "from": "adm", "arch": how["arch"]},
            "variance_type": how.get("variance_type", "learned_range")}
    sample_size = unet.config.sample_size
    return Prior(unet=prepare_unet(unet, device), schedule=DDPMSchedule.linear(1000),
                 resolution=int(sample_size if isinstance(sample_size, int) else sample_size[0]),
                 variance_type=meta["variance_type"], sha256=digest, uri=f"card:{name}", meta=meta)


def inspect_prior(spec: str) -> dict:
    """What ``prior inspect`` prints: resolution, schedule, variance type, parameters, sha256."""
    prior = load_prior(spec)
    n_params = sum(p.numel() for p in prior.unet.parameters())
    s = prior.schedule
    return {
        **prior.describe(),
        "parameters": n_params,
        "in_channels": int(prior.unet.config.in_channels),
        "out_channels": int(prior.unet.config.out_channels),
        "schedule": {"betas": "linear", "T": s.num_timesteps, "beta_start": float(s.betas[0]),
                     "beta_end": float(s.betas[-1]), "prediction": "epsilon",
                     "alpha_bar_T": float(s.alphas_cumprod[-1])},
    }

