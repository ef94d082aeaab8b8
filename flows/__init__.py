"""Prefect flows: one per stage, the CLI, deployments and schedules."""
