"""Augmentation for histology patches, written with numpy and scikit-image.

Each group is applied with its own probability (0.5 by default, as in Omni-Seg):

- geometric: random 90-degree turns and flips (always, lossless), then an affine
  warp with rotation (+-180 deg), shear (+-16 deg), per-axis scale (0.75-1.5) and
  translation (+-20 %); image bilinear, mask nearest, edges mirrored;
- zoom (off by default): with its own probability, an isotropic scale drawn
  log-uniformly from a range (e.g. 0.45-1.3), so a tissue is also seen smaller or
  larger than at its training magnification (a mouse glomerulus is about half the
  diameter of a human one at the same um/px);
- colour: stain jitter in haematoxylin-eosin-DAB space (per-stain scale and shift),
  gamma and brightness;
- noise: Gaussian blur (sigma <= 1) and additive Gaussian noise;
- colour transfer (off by default): with its own probability, the tissue pixels'
  CIELAB mean and spread are moved (Reinhard) to values drawn from the spread of the
  training images' own colour statistics (``lab_stats``, from :func:`lab_statistics`),
  so a patch is also seen in the colours of another slide or lab of the training set
  and between them (the idea of random stain normalisation, RandStainNA, Shen et al.
  2022);
- defocus (off by default): with its own probability, a loss of sharpness as another
  scanner, focus or resampling gives it: a Gaussian blur with sigma 0.5-2 px, or the
  image shrunk by 1.5-3x and enlarged back (bilinear), half the time each.  The
  shipped glomerular heads lose most of their Dice under a blur of 1 px at 5x
  (``benchmarks/defocus.py``), while the tubule heads do not.

All randomness comes from the ``numpy.random.Generator`` passed in, so a seed fixes
the result.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage as ndi
from skimage.color import hed2rgb, lab2rgb, rgb2hed, rgb2lab
from skimage.transform import AffineTransform, resize, warp


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
    #: probability of a strong stain change (all three HED channels scaled 0.6-1.4 and
    #: shifted), so that one lab's stain does not become the model's notion of a tissue
    p_strong_stain: float = 0.0
    strong_hed_scale: float = 0.4
    strong_hed_shift: float = 0.05
    #: saturation change (0 = unchanged; 0.3 = up to +-30 %), and a chance of a grey image
    saturation: float = 0.0
    p_grey: float = 0.0
    #: coarse dropout: up to this many rectangles of up to 1/8 of the side filled with the mean colour
    p_dropout: float = 0.0
    dropout_holes: int = 4
    #: isotropic zoom: probability and range (log-uniform); 0 = off, the reference's setting
    p_zoom: float = 0.0
    zoom: tuple[float, float] = (0.45, 1.3)
    #: defocus: probability, Gaussian blur sigma range (px) and down/up-sampling factor range
    p_defocus: float = 0.0
    defocus_sigma: tuple[float, float] = (0.5, 2.0)
    defocus_factor: tuple[float, float] = (1.5, 3.0)
    #: colour transfer: probability, and the training images' CIELAB statistics as 12
    #: numbers (mean over images of the tissue's L, a, b mean and of its L, a, b spread,
    #: then the standard deviation over images of the same six); None = off
    p_lab_transfer: float = 0.0
    lab_stats: tuple[float, ...] | None = None
    gamma: tuple[float, float] = (0.6, 1.6)
    brightness: float = 0.1
    blur_sigma: float = 1.0
    noise_sigma: float = 0.05


def augment(image: np.ndarray, mask: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig | None = None):
    """Augment one patch.  image: H x W x 3 float32 in [0, 1]; mask: H x W bool, or an
    integer label map H x W or H x W x K (moved with the image, values kept exactly)."""
    cfg = cfg or AugmentConfig()
    k = int(rng.integers(4))
    image, mask = np.rot90(image, k), np.rot90(mask, k)
    if rng.random() < 0.5:
        image, mask = image[:, ::-1], mask[:, ::-1]
    if rng.random() < cfg.p_geometric:
        image, mask = _affine(image, mask, rng, cfg)
    if cfg.p_zoom > 0 and rng.random() < cfg.p_zoom:
        image, mask = _zoom(image, mask, float(np.exp(rng.uniform(*np.log(cfg.zoom)))))
    if cfg.p_lab_transfer > 0 and cfg.lab_stats is not None and rng.random() < cfg.p_lab_transfer:
        image = _lab_transfer(image, rng, cfg.lab_stats)
    if rng.random() < cfg.p_color:
        image = _color(image, rng, cfg)
    if cfg.p_defocus > 0 and rng.random() < cfg.p_defocus:
        image = _defocus(image, rng, cfg)
    if rng.random() < cfg.p_noise:
        image = _noise(image, rng, cfg)
    if cfg.p_dropout > 0 and rng.random() < cfg.p_dropout:
        image = _dropout(image, rng, cfg)
    return np.ascontiguousarray(np.clip(image, 0.0, 1.0), dtype=np.float32), np.ascontiguousarray(mask)


def _affine(image, mask, rng, cfg):
    h, w = mask.shape[:2]
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
    if mask.dtype == bool:
        msk = warp(mask.astype(np.float32), inv, order=0, mode="reflect", preserve_range=True) > 0.5
    else:  # label maps (e.g. int8 targets with -1 = unknown, one channel per tissue): nearest, exact values
        msk = np.rint(warp(mask.astype(np.float32), inv, order=0, mode="reflect", preserve_range=True)).astype(mask.dtype)
    return img, msk


def _zoom(image, mask, z: float):
    """Scale about the centre by ``z`` (< 1 shrinks the content; the border is mirrored)."""
    h, w = mask.shape[:2]
    tf = AffineTransform(translation=(-w / 2, -h / 2)) + AffineTransform(scale=(z, z)) + \
        AffineTransform(translation=(w / 2, h / 2))
    inv = tf.inverse
    img = warp(image, inv, order=1, mode="reflect", preserve_range=True).astype(np.float32)
    if mask.dtype == bool:
        msk = warp(mask.astype(np.float32), inv, order=0, mode="reflect", preserve_range=True) > 0.5
    else:
        msk = np.rint(warp(mask.astype(np.float32), inv, order=0, mode="reflect", preserve_range=True)).astype(mask.dtype)
    return img, msk


def _color(image, rng, cfg):
    hed = rgb2hed(image)
    if rng.random() < cfg.p_strong_stain:
        a = rng.uniform(1 - cfg.strong_hed_scale, 1 + cfg.strong_hed_scale, size=3)
        b = rng.uniform(-cfg.strong_hed_shift, cfg.strong_hed_shift, size=3)
    else:
        a = rng.uniform(1 - cfg.hed_scale, 1 + cfg.hed_scale, size=3)
        b = rng.uniform(-cfg.hed_shift, cfg.hed_shift, size=3)
    image = hed2rgb(hed * a + b).astype(np.float32)
    if cfg.saturation > 0 or cfg.p_grey > 0:
        grey = image.mean(axis=2, keepdims=True)
        f = 0.0 if rng.random() < cfg.p_grey else rng.uniform(1 - cfg.saturation, 1 + cfg.saturation)
        image = grey + (image - grey) * np.float32(f)
    image = np.clip(image, 0, 1) ** rng.uniform(*cfg.gamma)
    return image + rng.uniform(-cfg.brightness, cfg.brightness)


#: a pixel is tissue when its darkest channel is below this (glass is left as it is)
TISSUE_DARKEST = 215 / 255


def _tissue_lab(image: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(CIELAB image, tissue mask) of a float [0, 1] or uint8 RGB image; the whole image
    counts as tissue when fewer than 100 pixels are."""
    img = image.astype(np.float32) / 255.0 if image.dtype == np.uint8 else np.clip(image, 0, 1)
    tissue = img.min(axis=2) < TISSUE_DARKEST
    if tissue.sum() < 100:
        tissue = np.ones(tissue.shape, bool)
    return rgb2lab(img), tissue


def lab_statistics(images) -> tuple[float, ...]:
    """The 12 numbers ``AugmentConfig.lab_stats`` holds, from RGB images (uint8 or float):
    per image the CIELAB mean and standard deviation of its tissue pixels, then their
    mean and standard deviation over the images."""
    per = []
    for im in images:
        lab, t = _tissue_lab(np.asarray(im)[..., :3])
        px = lab[t]
        per.append(np.concatenate([px.mean(0), px.std(0)]))
    per = np.asarray(per, dtype=np.float64)
    return tuple(float(v) for v in np.concatenate([per.mean(0), per.std(0)]))


def _lab_transfer(image, rng, stats):
    """Reinhard: the tissue pixels' CIELAB mean and spread moved to a drawn target."""
    st = np.asarray(stats, dtype=np.float64)
    mu_t = rng.normal(st[0:3], st[6:9])
    sd_t = np.maximum(rng.normal(st[3:6], st[9:12]), 0.25 * st[3:6])
    lab, t = _tissue_lab(image)
    px = lab[t]
    mu, sd = px.mean(0), px.std(0) + 1e-6
    lab[t] = (px - mu) / sd * sd_t + mu_t
    lab[..., 0] = np.clip(lab[..., 0], 0, 100)
    import warnings

    with warnings.catch_warnings():  # out-of-gamut colours are clipped, as intended
        warnings.simplefilter("ignore")
        return lab2rgb(lab).astype(np.float32)


def _noise(image, rng, cfg):
    s = rng.uniform(0, cfg.blur_sigma)
    if s > 0.1:
        image = ndi.gaussian_filter(image, sigma=(s, s, 0))
    return image + rng.normal(0, rng.uniform(0, cfg.noise_sigma), size=image.shape).astype(np.float32)


def _defocus(image, rng, cfg):
    """Less sharpness, the same content and size: a blur, or a shrink and enlarge back."""
    if rng.random() < 0.5:
        s = rng.uniform(*cfg.defocus_sigma)
        return ndi.gaussian_filter(image, sigma=(s, s, 0))
    h, w = image.shape[:2]
    f = rng.uniform(*cfg.defocus_factor)
    small = resize(image, (max(2, round(h / f)), max(2, round(w / f))), order=1, anti_aliasing=True,
                   preserve_range=True)
    return resize(small, (h, w), order=1, anti_aliasing=False, preserve_range=True).astype(np.float32)


def _dropout(image, rng, cfg):
    h, w = image.shape[:2]
    image = image.copy()
    fill = image.reshape(-1, image.shape[2]).mean(axis=0)
    for _ in range(int(rng.integers(1, cfg.dropout_holes + 1))):
        hh, ww = int(rng.integers(1, max(2, h // 8))), int(rng.integers(1, max(2, w // 8)))
        y, x = int(rng.integers(0, h - hh + 1)), int(rng.integers(0, w - ww + 1))
        image[y : y + hh, x : x + ww] = fill
    return image


def strong_augment() -> AugmentConfig:
    """The colour-robust setting ``omniseg train`` uses unless told ``--mild-augment``: strong
    stain changes, saturation and grey images, coarse dropout (the defaults are the reference's
    mild ones, with which the shipped model was trained)."""
    return AugmentConfig(p_color=0.8, p_strong_stain=0.5, saturation=0.3, p_grey=0.1, p_dropout=0.3)


def random_crop(image, mask, size: int, rng: np.random.Generator):
    """A random ``size`` x ``size`` crop (mirror-padded if the patch is smaller)."""
    h, w = mask.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)), mode="reflect")
        mask = np.pad(mask, ((0, ph), (0, pw)), mode="reflect")
        h, w = mask.shape
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    return image[y : y + size, x : x + size], mask[y : y + size, x : x + size]


def object_crop(image, labels, size: int, rng: np.random.Generator, focus: np.ndarray | None, p_object: float):
    """A ``size`` crop that, with probability ``p_object``, contains a pixel of ``focus``.

    ``focus`` (H x W bool, the labelled object) picks a random object pixel, and the
    crop is placed at a random offset around it so the object is not always central.
    Otherwise (or when ``focus`` is empty) the crop is uniform, as :func:`random_crop`.
    """
    h, w = labels.shape[:2]
    if h < size or w < size:
        ph, pw = max(0, size - h), max(0, size - w)
        pad = ((0, ph), (0, pw))
        image = np.pad(image, pad + ((0, 0),), mode="reflect")
        labels = np.pad(labels, pad + ((0, 0),) * (labels.ndim - 2), mode="reflect")
        if focus is not None:
            focus = np.pad(focus, pad, mode="reflect")
        h, w = labels.shape[:2]
    if focus is not None and rng.random() < p_object:
        ys, xs = np.nonzero(focus)
        if ys.size:
            k = int(rng.integers(ys.size))
            y = int(np.clip(ys[k] - rng.integers(size // 8, size - size // 8), 0, h - size))
            x = int(np.clip(xs[k] - rng.integers(size // 8, size - size // 8), 0, w - size))
            return image[y : y + size, x : x + size], labels[y : y + size, x : x + size]
    y = int(rng.integers(h - size + 1))
    x = int(rng.integers(w - size + 1))
    return image[y : y + size, x : x + size], labels[y : y + size, x : x + size]
