"""``open_slide``: pick the reader for a path by its extension and content."""

from __future__ import annotations

from pathlib import Path

from .base import SlideError, SlideSource, check_mpp

#: vendor formats read through OpenSlide (optional extra)
OPENSLIDE_EXTENSIONS = {".ndpi", ".mrxs", ".scn", ".vms", ".vmu", ".bif", ".svslide"}
#: TIFF-family extensions read through tifffile
TIFF_EXTENSIONS = {".tif", ".tiff", ".svs", ".btf", ".tf8", ".tf2", ".qptiff"}
#: plain images decoded in memory
IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg"}

SUPPORTED = (
    "Aperio SVS, OME-TIFF, tiled or plain TIFF, OME-Zarr (NGFF 0.4 / 0.5), PNG/JPEG (with --mpp); "
    "NDPI, MRXS, SCN and other vendor formats with the openslide extra"
)


def _magic(path: Path) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(8)
    except OSError as e:
        raise SlideError(f"{path}: cannot read the file ({e})") from e


def _is_zarr_dir(path: Path) -> bool:
    return any((path / n).exists() for n in ("zarr.json", ".zattrs", ".zgroup")) or path.suffix.lower() == ".zarr"


def open_slide(path: "str | Path", mpp: float | None = None, require_mpp: bool = True) -> SlideSource:
    """Open a slide with the right reader.

    - a directory holding a Zarr store (``zarr.json`` / ``.zattrs``) or named
      ``*.zarr``: :class:`~.omezarr.OmeZarrSlide`;
    - ``.ndpi .mrxs .scn .vms .vmu .bif .svslide``: :class:`~.openslide_reader.OpenSlideSlide`
      (needs ``pip install napari-omniseg[openslide]``);
    - TIFF content (``.svs``, ``.ome.tif``, ``.tif``, or any file starting with the TIFF
      signature): :class:`~.tiff.TiffSlide` (lazy, tile by tile);
    - PNG / JPEG: :class:`~.image.ImageSlide` (in memory; ``mpp`` required);
    - anything else: OpenSlide when installed, else an error listing what is supported.

    ``mpp`` (microns per pixel at level 0), when given, **overrides** the file's value;
    the file's value stays in ``source.file_mpp``.  When neither exists,
    :class:`~.base.MissingMppError` asks for ``--mpp`` (pass ``require_mpp=False`` to
    open such a file anyway, e.g. only to look at it; ``source.mpp`` then raises).
    """
    p = Path(path)
    if mpp is not None:
        mpp = check_mpp(mpp, p)
    if not p.exists():
        raise SlideError(f"{p}: no such file or directory")
    if p.is_dir():
        if _is_zarr_dir(p):
            from .omezarr import OmeZarrSlide

            return OmeZarrSlide(p, mpp=mpp, require_mpp=require_mpp)
        raise SlideError(f"{p}: is a directory but not a Zarr store; supported: {SUPPORTED}")
    ext = p.suffix.lower()
    if ext in OPENSLIDE_EXTENSIONS:
        from .openslide_reader import OpenSlideSlide

        return OpenSlideSlide(p, mpp=mpp, require_mpp=require_mpp)
    head = _magic(p)
    if head[:4] in (b"II*\x00", b"MM\x00*", b"II+\x00", b"MM\x00+"):
        from .tiff import TiffSlide

        return TiffSlide(p, mpp=mpp, require_mpp=require_mpp)
    if head[:8] == b"\x89PNG\r\n\x1a\n" or head[:3] == b"\xff\xd8\xff" or ext in IMAGE_EXTENSIONS:
        from .image import ImageSlide

        return ImageSlide(p, mpp=mpp, require_mpp=require_mpp)
    if ext in TIFF_EXTENSIONS:
        raise SlideError(f"{p}: has a TIFF extension but does not start with a TIFF signature (truncated or corrupt?)")
    from .openslide_reader import OpenSlideSlide, openslide_available

    if openslide_available():
        return OpenSlideSlide(p, mpp=mpp, require_mpp=require_mpp)
    raise SlideError(
        f"{p}: unrecognised slide format; supported: {SUPPORTED}. "
        "For other vendor formats install `pip install napari-omniseg[openslide]`"
    )
