"""Precision is one enum: every CLI flag, artifact and manifest names one of these."""

from __future__ import annotations

from enum import Enum
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # imported where a dtype is asked for: the CLI's --help reads this enum
    import torch


class Precision(str, Enum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP16 = "fp16"
    FP8 = "fp8"  # E4M3 W8A8, bf16 elsewhere
    INT8 = "int8"  # SmoothQuant W8A8, bf16 elsewhere

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype of activations between quantized GEMMs (and of every non-quantized op)."""
        import torch

        return {Precision.FP32: torch.float32, Precision.FP16: torch.float16}.get(self, torch.bfloat16)

    @property
    def is_quantized(self) -> bool:
        return self in (Precision.FP8, Precision.INT8)

    @classmethod
    def parse(cls, value: str | Precision) -> Precision:
        try:
            return cls(value)
        except ValueError:
            raise ValueError(f"unknown precision {value!r}; choose one of {', '.join(p.value for p in cls)}") from None
