"""Thin Prefect tasks over the core (tasc/) and persistence (storage/)."""
