"""A tiny shipped diffusion model for demos, tests and benchmarks.

`fxprop/demo/digits/` holds a class-conditional pixel-space UNet trained on
scikit-learn's 8x8 handwritten digits (upsampled to 16x16), in diffusers
format, plus a small digit classifier used to score samples. It lets the
accelerator be exercised end to end on a CPU, offline, in seconds.
"""

from pathlib import Path

DIGITS_DIR = Path(__file__).resolve().parent / "digits"
#: The shipped calibration of the digits model: 50 DDIM steps, FLOP-ideal 2x
#: (``python -m fxprop calibrate --out ...`` remakes it).
DIGITS_CALIBRATION = Path(__file__).resolve().parent / "digits-ddim50-2x.json"

__all__ = ["DIGITS_DIR", "DIGITS_CALIBRATION", "load_digits_pipeline"]


def load_digits_pipeline(path=None, **kwargs):
    """Load the shipped `DigitsPipeline` (offline; `path` defaults to DIGITS_DIR)."""
    from .pipeline import DigitsPipeline

    kwargs.setdefault("low_cpu_mem_usage", False)  # a 7 MB model: no need for `accelerate`
    return DigitsPipeline.from_pretrained(str(path or DIGITS_DIR), **kwargs)
