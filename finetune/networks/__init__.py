"""Trainable side networks that attach to a frozen model without changing its weights (hypernetworks)."""
