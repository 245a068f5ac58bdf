"""Stage 1, the task's data: the task spec (YAML), readers for JSONL/CSV/Parquet/datasets
sources, ingestion into one corpus with a deterministic split, and prompt rendering."""
