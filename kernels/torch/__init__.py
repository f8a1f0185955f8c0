"""The ops in plain PyTorch: the CPU path and the fallback on any device."""
