"""Prefect flows: ``bitdistill`` chains the stages; presets for the tiny offline world and real models."""
