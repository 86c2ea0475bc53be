"""Rank layout: megatron-core and DeepSpeed process groups built from one description."""
