"""The science of bfr-curate: plain functions and models, no Prefect."""
