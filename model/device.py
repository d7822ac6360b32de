"""Where torch runs and at which precision: one place, so serving and training agree."""

from __future__ import annotations

from typing import Literal

import torch


def resolve_device(preference: Literal["auto", "cpu", "cuda"] = "auto") -> torch.device:
    """`cuda` when asked for or when `auto` and torch sees a GPU; `cpu` otherwise.

    Raises:
        ValueError: `cuda` was asked for and there is none.
    """
    if preference == "cuda" and not torch.cuda.is_available():
        raise ValueError("model.device is 'cuda' but torch sees no GPU")
    if preference == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda")


def autocast_dtype(
    device: torch.device, cpu_dtype: Literal["fp32", "bf16"] = "fp32"
) -> torch.dtype | None:
    """The autocast dtype for inference/training on `device`, or None for plain fp32.

    GPU: bf16 where supported (no loss scaling needed), else fp16. CPU: bf16 only when asked.
    """
    if device.type == "cuda":
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return torch.bfloat16 if cpu_dtype == "bf16" else None
