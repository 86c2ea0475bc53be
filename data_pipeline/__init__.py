"""Kiln data pipeline: read, clean, deduplicate, tokenise and shard corpora (Ray Data)."""
