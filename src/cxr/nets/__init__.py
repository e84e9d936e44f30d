"""Nets: the architectures (a registry), the paper's head, and safetensors checkpoints with metadata."""
