"""Torch devices: resolve ``"auto"``, describe the device for run records, seed torch."""

from __future__ import annotations

import os

import torch


def resolve_device(device: str = "auto"):
    """``"auto"`` -> CUDA if available, else Apple MPS, else CPU; otherwise ``torch.device(device)``."""
    if device == "auto":
        if torch.cuda.is_available():
            return torch.device("cuda")
        if getattr(torch.backends, "mps", None) is not None and torch.backends.mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(device)


def describe_device(device: str = "auto") -> str:
    dev = resolve_device(device)
    if dev.type == "cuda":
        return f"cuda ({torch.cuda.get_device_name(dev)})"
    return f"{dev.type} ({os.cpu_count()} CPUs, torch threads {torch.get_num_threads()})"


def set_threads(n: int) -> None:
    """Use ``n`` CPU threads in torch (0 or None keeps torch's default)."""
    if n:
        torch.set_num_threads(int(n))


def seed_torch(seed: int) -> None:
    """Seed torch's global generator (the stage context calls it with the core seeds)."""
    torch.manual_seed(seed)


def dist_info() -> tuple[int, int, int]:
    """(rank, world size, local rank) from torchrun's environment (1 process: 0, 1, 0)."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)), int(os.environ.get("LOCAL_RANK", 0))
