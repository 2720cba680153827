"""Quantized linear layers and checkpoint formats."""
