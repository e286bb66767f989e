"""A small CNN that classifies 16x16 digits, and the held-out real digits.

Used to score samples of the shipped `DigitsPipeline`: the fraction of
samples labelled as the requested digit measures conditional quality, and the
penultimate features give a Fréchet distance (an "FID" for digits) against
the real held-out digits that neither model was trained on.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torch import nn

from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from safetensors.torch import load_file

from . import DIGITS_DIR

HELDOUT_FILE = "heldout.safetensors"
CLASSIFIER_SUBFOLDER = "classifier"


class DigitClassifier(ModelMixin, ConfigMixin):
    """Conv(16x16) -> conv(8x8) -> `feature_dim` features -> 10 logits.

    Inputs are (B, 1, 16, 16) images in [-1, 1] (the pipeline's "pt" output
    mapped back with `x * 2 - 1`, or `to_model_range`).
    """

    @register_to_config
    def __init__(self, width: int = 32, feature_dim: int = 64, num_classes: int = 10):
        super().__init__()
        w = width
        self.convs = nn.Sequential(
            nn.Conv2d(1, w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(w, w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(w, 2 * w, 3, padding=1), nn.ReLU(),
            nn.Conv2d(2 * w, 2 * w, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.features = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(2 * w * 16, feature_dim), nn.ReLU())
        self.head = nn.Linear(feature_dim, num_classes)

    def forward_with_features(self, images: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (logits (B, 10), penultimate features (B, feature_dim))."""
        feats = self.features(self.convs(images))
        return self.head(feats), feats

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        """Return logits (B, 10)."""
        return self.forward_with_features(images)[0]


def to_model_range(images) -> torch.Tensor:
    """Convert pipeline output ("pt" (B,1,H,W) or "np" (B,H,W,1) in [0,1]) to [-1,1] tensors."""
    if isinstance(images, np.ndarray):
        images = torch.from_numpy(images).permute(0, 3, 1, 2)
    return images.float() * 2 - 1


def load_classifier(path: str | Path | None = None) -> DigitClassifier:
    """Load the shipped classifier (in eval mode) from `<path>/classifier`."""
    model = DigitClassifier.from_pretrained(str(path or DIGITS_DIR), subfolder=CLASSIFIER_SUBFOLDER,
                                            low_cpu_mem_usage=False)
    return model.eval()


def load_heldout(path: str | Path | None = None) -> dict[str, torch.Tensor]:
    """Held-out real digits: "images" (N,1,16,16) in [-1,1], "labels" (N,), "indices" (N,).

    `indices` index `sklearn.datasets.load_digits()`; neither the UNet nor the
    classifier was trained on these.
    """
    return load_file(str(Path(path or DIGITS_DIR) / HELDOUT_FILE))


@torch.no_grad()
def classify(model: DigitClassifier, images: torch.Tensor, batch_size: int = 512):
    """Return (predicted labels (N,), features (N, feature_dim)) for [-1,1] images."""
    preds, feats = [], []
    for chunk in images.split(batch_size):
        logits, f = model.forward_with_features(chunk.float())
        preds.append(logits.argmax(1))
        feats.append(f)
    return torch.cat(preds), torch.cat(feats)


def frechet_distance(feats_a: torch.Tensor, feats_b: torch.Tensor) -> float:
    """Fréchet distance between Gaussians fitted to two feature sets (as in FID)."""
    a, b = feats_a.double().numpy(), feats_b.double().numpy()
    mu_a, mu_b = a.mean(0), b.mean(0)
    cov_a, cov_b = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
    # tr(sqrt(A B)) from the eigenvalues of sqrt(A) B sqrt(A), which is symmetric PSD.
    vals, vecs = np.linalg.eigh(cov_a)
    sqrt_a = (vecs * np.sqrt(np.clip(vals, 0, None))) @ vecs.T
    cross = np.linalg.eigvalsh(sqrt_a @ cov_b @ sqrt_a)
    tr_sqrt = np.sqrt(np.clip(cross, 0, None)).sum()
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a) + np.trace(cov_b) - 2 * tr_sqrt)
