"""FID: Inception features and the Frechet distance, under an explicit, recorded convention.

Two conventions, never mixed (see ``shared/specs/peers_and_ecosystem.md`` §2.2):

``clean`` (the default) — clean-fid's ``mode="clean"``.
    Each 8-bit image is resized to 299x299 channel by channel with PIL's bicubic filter on a
    float32 ('F' mode) image, clipped to [0, 255] (clean-fid ``make_resizer("PIL", False,
    "bicubic", (299, 299))``), then normalised as ``(x - 128) / 128``.
    Network: clean-fid's TorchScript TF-Inception ``inception-2015-12-05.pt`` (model card
    ``fid_inception_clean``); its ``layers`` module gives the 2048-d pool3 features, exactly as
    clean-fid calls it. Given a pytorch-fid state dict instead (``weights_path`` pointing at
    ``pt_inception-2015-12-05-6726825d.pth``), the same input goes through our reimplementation of
    pytorch-fid's FID-Inception: that is how pyiqa computes its clean FID. The network used is part
    of :attr:`InceptionFeatures.network` and of every record.

``legacy_pytorch`` — pytorch-fid (and clean-fid's ``legacy_pytorch``).
    The 8-bit image as floats in [0, 1], ``F.interpolate(..., (299, 299), mode="bilinear",
    align_corners=False)``, then ``2x - 1``. Network: pytorch-fid's FID-Inception (torchvision's
    Inception-v3 with TF's pooling: average pools that ignore padding in the A/C/E_1 blocks, a max
    pool in the last E block) with weights ``pt_inception-2015-12-05-6726825d.pth`` (model card
    ``fid_inception_pytorch``).

Float images are first quantised to 8 bits (``round(clip(x, 0, 1) * 255)``), so features of a
tensor equal those of the PNG it is saved as: both references read 8-bit files.

Reference statistics come from a stats file (``.npz`` with ``mu``, ``sigma`` and, when written
here, ``n``/``convention``/``source``/``network``), a manifest, or a folder; the last two are
computed once and cached under a key made from the set's content. Features are cached per image
content hash in ``.npz`` shards, so adding images to a set extracts only the new ones.

The code lives in three modules, re-exported here: ``fid_stats`` (conventions, statistics, stats files, the
distance), ``fid_network`` (the networks and each convention's preprocessing) and ``fid_features`` (feature
extraction by URI, the feature cache, reference statistics).
"""

from bfr_models.metrics.fid_features import (FeatureCache, FeatureSet, ImageRef, Reference, _short_hash,  # noqa: F401
                                             extract_features, plan_reference, read_shard_features,
                                             reference_stats, shard_features_uri, write_shard_features)
from bfr_models.metrics.fid_network import (FIDInceptionV3, InceptionFeatures, clean_resize,  # noqa: F401
                                            legacy_pytorch_resize, to_uint8_images)
from bfr_models.metrics.fid_stats import (CONVENTIONS, DEFAULT_CONVENTION, FEATURE_CODE_VERSION,  # noqa: F401
                                          FEATURE_DIM, INCEPTION_CARDS, INPUT_SIZE, MIN_REFERENCE_IMAGES,
                                          STATS_FORMAT_VERSION, FeatureSums, FIDConvention, FIDError, FIDResult,
                                          FIDStats, check_convention, check_reference_size, fid_from_stats,
                                          frechet_distance, stats_from_features)
