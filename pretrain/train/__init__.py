"""Training components: learning-rate schedule, FLOPs and MFU, metric tracking."""
