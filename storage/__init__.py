"""Persistence: the only code that touches MLflow, Parquet layouts, artifact URIs and env settings."""
