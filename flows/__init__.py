"""Prefect flows: one per stage, and the end-to-end pipeline."""
