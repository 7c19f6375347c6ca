"""Prefect tasks: thin wrappers that run a bitnet stage on a compute backend and return an ArtifactRef."""
