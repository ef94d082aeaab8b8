"""Training loops that are not diffusion priors: restorer fine-tuning (:mod:`.finetune`) and its parts
(:mod:`.discriminator`, :mod:`.swinir`), and the resumable-state helpers they share (:mod:`.state`).

No Prefect here (see ``flows/finetune.py``).
"""
