"""Kiln pretraining: configuration, model, parallel layout, training engine, export."""
