"""Augmentation for histology patches, written with numpy and scikit-image.

Each group is applied with its own probability (0.5 by default, as in Omni-Seg):

- geometric: random 90-degree turns and flips (always, lossless), then an affine
  warp with rotation (+-180 deg), shear (+-16 deg), per-axis scale (0.75-1.5) and
  translation (+-20 %); image bilinear, mask nearest, edges mirrored;
- colour: stain jitter in haematoxylin-eosin-DAB space (per-stain scale and shift),
  gamma and brightness;
- noise: Gaussian blur (sigma <= 1) and additive Gaussian noise.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed fixes
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, rgb2hed
from skimage.transform import AffineTransform, warp


@dataclass
class AugmentConfig:
    p_geometric: float = 0.5
    p_color: float = 0.5
    p_noise: float = 0.5
    rotate_deg: float = 180.0
    shear_deg: float = 16.0
    scale: tuple[float, float] = (0.75, 1.5)
    translate: float = 0.2
    hed_scale: float = 0.05
    hed_shift: float = 0.02
    gamma: tuple[float, float] = (0.6, 1.6)
    brightness: float = 0.1
    blur_sigma: float = 1.0
    noise_sigma: float = 0.05


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None):
    """Augment one patch.  image: H x W x 3 float32 in [0, 1]; mask: H x W bool."""
    cfg = cfg or AugmentConfig()
    k = int(rng.integers(4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < cfg.p_geometric:
        image, mask = _affine(image, mask, rng, cfg)
    if rng.random() < cfg.p_color:
        image = _color(image, rng, cfg)
    if rng.random() < cfg.p_noise:
        image = _noise(image, rng, cfg)
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32), np.ascontiguousarray(mask)


def _affine(image, mask, rng, cfg):
    h, w = mask.shape
    rot = np.deg2rad(rng.uniform(-cfg.rotate_deg, cfg.rotate_deg))
    shear = np.deg2rad(rng.uniform(-cfg.shear_deg, cfg.shear_deg))
    sx, sy = rng.uniform(*cfg.scale, size=2)
    tx, ty = rng.uniform(-cfg.translate, cfg.translate, size=2) * (w, h)
    centre = AffineTransform(translation=(-w / 2, -h / 2))
    core = AffineTransform(scale=(sx, sy), rotation=rot, shear=shear)
    back = AffineTransform(translation=(w / 2 + tx, h / 2 + ty))
    tf = centre + core + back  # maps input -> output coordinates
    inv = tf.inverse
    img = warp(image, inv, order=1, mode="reflect", preserve_range=True).astype(np.float32)
    msk = warp(mask.astype(np.float32), inv, order=0, mode="reflect", preserve_range=True) > 0.5
    return img, msk


def _color(image, rng, cfg):
    hed = rgb2hed(image)
    a = rng.uniform(1 - cfg.hed_scale, 1 + cfg.hed_scale, size=3)
    b = rng.uniform(-cfg.hed_shift, cfg.hed_shift, size=3)
    image = hed2rgb(hed * a + b).astype(np.float32)
    image = np.clip(image, 0, 1) ** rng.uniform(*cfg.gamma)
    return image + rng.uniform(-cfg.brightness, cfg.brightness)


def _noise(image, rng, cfg):
    s = rng.uniform(0, cfg.blur_sigma)
    if s > 0.1:
        image = ndi.gaussian_filter(image, sigma=(s, s, 0))
    return image + rng.normal(0, rng.uniform(0, cfg.noise_sigma), size=image.shape).astype(np.float32)


def random_crop(image, mask, size: int, rng: np.random.Generator):
    """A random ``size`` x ``size`` crop (mirror-padded if the patch is smaller)."""
    h, w = mask.shape
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
        h, w = mask.shape
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]
