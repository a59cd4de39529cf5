"""Fused optimizers (FusedAdam, FusedAdamW, FusedSGD)."""
