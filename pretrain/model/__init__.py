"""The decoder model and its closed-form sizes."""
