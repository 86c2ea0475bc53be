"""Hugging Face interoperability: export, import, and the mapping between the two."""
