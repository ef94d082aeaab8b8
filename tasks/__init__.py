"""Prefect tasks: one shard in, one shard out. Thin wrappers over bfr_models."""
