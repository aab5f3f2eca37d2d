"""Fused autograd functions for the hot paths (pure PyTorch, device-agnostic)."""
