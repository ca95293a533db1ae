"""The batched multi-tissue inference engine.

For every magnification among the requested tissues: read tiles (a prefetch thread
reads and resamples while the model computes), run the backbone ONCE per tile, then
the tiny head of every tissue at that magnification, blend the overlapping tiles and
hand finished blocks to a *sink* (an in-memory region, or the OME-Zarr writer).
Memory holds only the blocks still waiting for a neighbouring tile, so it does not
grow with the slide.

Background tiles (no tissue in the slide's low-resolution tissue mask) are not run
and come out as background.  A tile that cannot be read (corrupt or truncated data)
is reported, and its block is marked *unknown* (label value 255), not background.
"""

from __future__ import annotations

import logging
import os
import queue
import threading
import time
import warnings
import weakref
from collections import deque
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Callable, Iterable, Protocol, Sequence

import numpy as np
import torch

from ..model.checkpoint import Checkpoint
from ..tissues import Tissue, resolve_tissues
from .plan import MagPlan, make_plans, ramp_window, region_in_plan
from .precision import autocast, resolve_precision

log = logging.getLogger(__name__)

GPU_BATCH = 16  #: default tiles per model call on CUDA
UNKNOWN = 255  #: label value of pixels that could not be analysed (unreadable tile)
#: a pixel whose darkest channel is above this is white (glass) for ``clear_glass``
#: (0.94 x 255, the tissue mask's own "white")
WHITE_GLASS = 240

ProgressFn = Callable[[dict], None]
StopFn = Callable[[], bool]


class SegmentationCancelled(RuntimeError):
    pass


class CorruptTileWarning(UserWarning):
    pass


@dataclass
class EngineConfig:
    core: int = 512  #: output block side in target pixels (also the zarr chunk side)
    margin: int = 32  #: context added on every side of a block; tiles overlap by 2 * margin
    #: tiles per model call; 0 = auto: 1 on CPU (measured fastest per tile there) and
    #: ``GPU_BATCH`` on CUDA
    batch_size: int = 0
    device: str = "auto"
    #: auto (bf16 on CUDA and on CPUs with AMX/AVX-512 bf16, fp16 on older GPUs, else
    #: fp32), fp32, bf16 or fp16 (CUDA only); see ``precision.py``
    precision: str = "auto"
    skip_background: bool = True
    prefetch: int = 2  #: batches read ahead
    #: threads reading and resampling tiles (tiles still reach the model in a fixed
    #: order); 0 = auto: 1 on CPU (its cores run the model), up to 4 on CUDA
    readers: int = 0
    #: 1 = thresholds, review scores and zarr writes of finished blocks run in a thread
    #: of their own, beside the model; 0 = in the loop that feeds the model; -1 = auto
    #: (a thread on CUDA, where the model waits for the CPU otherwise; none on CPU)
    writers: int = -1
    threads: int = 0  #: torch CPU threads (0 = leave as is)
    #: with ``skip_background``: white pixels (``WHITE_GLASS``) outside the tissue mask
    #: (grown by one mask pixel, 16 um) are background for every tissue, also inside
    #: tiles that hold tissue
    clear_glass: bool = True
    #: with ``skip_background``: in a tile that is partly glass, every normalisation's
    #: statistics and the pooled head vector are taken over the tissue mask (grown as
    #: for ``clear_glass``) only, so the glass around a fragment or at a biopsy's edge
    #: does not change what the network sees in the tissue; tiles all tissue are as
    #: before.  None = as the model was trained (its ``NetConfig.statistics``)
    tissue_statistics: "bool | None" = None


@dataclass
class RunReport:
    tiles_total: int = 0
    tiles_run: int = 0
    tiles_skipped: int = 0
    tiles_failed: list = field(default_factory=list)  #: (magnification, ti, tj, message)
    blocks_written: int = 0
    blocks_resumed: int = 0
    seconds: float = 0.0
    model_seconds: float = 0.0
    read_seconds: float = 0.0


class Sink(Protocol):
    def done_blocks(self, plan: MagPlan) -> set: ...

    def write_block(self, plan: MagPlan, bi: int, bj: int, labels: dict[str, np.ndarray]) -> None: ...

    # optional: write_scores(plan, bi, bj, scores), prepare_scores(plans), and flush(),
    # called when a run ends (cancelled or not) to record what was written


def pick_device(name: str | None = "auto") -> torch.device:
    if name in (None, "", "auto"):
        if torch.cuda.is_available():
            return torch.device("cuda")
        mps = getattr(torch.backends, "mps", None)
        if mps is not None and mps.is_available():
            return torch.device("mps")
        return torch.device("cpu")
    return torch.device(name)


def _tile_box(plan: MagPlan, ti: int, tj: int):
    s = plan.tile_size
    oy, ox = plan.tile_origin(ti, tj)
    H, W = plan.shape
    return oy, ox, max(oy, 0), max(ox, 0), min(oy + s, H), min(ox + s, W)


def _read_box(source, plan: MagPlan, y0: int, x0: int, y1: int, x1: int) -> np.ndarray:
    """Pixels of the plan's grid [y0:y1, x0:x1] (inside the slide)."""
    f = plan.factor
    img = np.asarray(source.read_at_mpp(plan.mpp, int(round(y0 * f)), int(round(x0 * f)), y1 - y0, x1 - x0))
    if img.shape[:2] != (y1 - y0, x1 - x0):
        raise ValueError(f"reader returned {img.shape[:2]}, expected {(y1 - y0, x1 - x0)}")
    return img


def _pad_tile(img: np.ndarray, plan: MagPlan, oy, ox, y0, x0, y1, x1) -> np.ndarray:
    s = plan.tile_size
    pad = ((y0 - oy, oy + s - y1), (x0 - ox, ox + s - x1)) + ((0, 0),) * (img.ndim - 2)
    if any(p for pair in pad for p in pair):
        mode = "reflect" if min(img.shape[:2]) > 1 else "edge"
        img = np.pad(img, pad, mode=mode)
    return img


def read_tile(source, plan: MagPlan, ti: int, tj: int) -> np.ndarray:
    """The tile's pixels at the plan's resolution, mirror-padded past the slide's edge."""
    oy, ox, y0, x0, y1, x1 = _tile_box(plan, ti, tj)
    return _pad_tile(_read_box(source, plan, y0, x0, y1, x1), plan, oy, ox, y0, x0, y1, x1)


#: a tile that cannot be read whole is re-read in quarters, recursively, down to pieces of
#: this side (plan pixels): only the pieces that still fail are lost, not the whole tile
MIN_PIECE = 32


def _split(lo: int, hi: int, step: int):
    """Where to cut [lo, hi): on the plan's grid of ``step`` pixels, so that every tile
    loses the same pieces of a damaged area; None if it is one grid cell already."""
    m = ((lo + hi) // 2) // step * step
    if m <= lo:
        m = (lo // step + 1) * step
    return m if lo < m < hi else None


def read_tile_pieces(source, plan: MagPlan, ti: int, tj: int, min_piece: int = MIN_PIECE):
    """Read a tile that failed as a whole piece by piece.

    Returns ``(pixels, unreadable)``: the tile (unreadable pieces filled with the mean
    colour of the readable ones) and a bool mask of its unreadable pixels, or
    ``(None, None)`` when no piece can be read.
    """
    oy, ox, y0, x0, y1, x1 = _tile_box(plan, ti, tj)
    parts: list = []  # (y0, x0, pixels)
    bad: list = []  # (y0, x0, y1, x1)

    def visit(a0, b0, a1, b1):
        try:
            parts.append((a0, b0, _read_box(source, plan, a0, b0, a1, b1)))
            return
        except Exception:  # noqa: BLE001 - any decoder error: split and retry
            pass
        am, bm = _split(a0, a1, min_piece), _split(b0, b1, min_piece)
        if am is None and bm is None:
            bad.append((a0, b0, a1, b1))
            return
        am, bm = am or a1, bm or b1
        for p0, p1 in ((a0, am), (am, a1)):
            for q0, q1 in ((b0, bm), (bm, b1)):
                if p0 < p1 and q0 < q1:
                    visit(p0, q0, p1, q1)

    visit(y0, x0, y1, x1)
    if not parts:
        return None, None
    ch = parts[0][2].shape[2:]
    img = np.empty((y1 - y0, x1 - x0, *ch), parts[0][2].dtype)
    lost = np.zeros((y1 - y0, x1 - x0), bool)
    total = np.zeros(ch, np.float64)
    n = 0
    for a0, b0, px in parts:
        img[a0 - y0 : a0 - y0 + px.shape[0], b0 - x0 : b0 - x0 + px.shape[1]] = px
        total += px.reshape(-1, *ch).sum(0)
        n += px.shape[0] * px.shape[1]
    fill = np.round(total / max(n, 1)).astype(img.dtype)
    for a0, b0, a1, b1 in bad:
        img[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = fill
        lost[a0 - y0 : a1 - y0, b0 - x0 : b1 - x0] = True
    return (_pad_tile(img, plan, oy, ox, y0, x0, y1, x1),
            _pad_tile(lost, plan, oy, ox, y0, x0, y1, x1))


class Segmenter:
    """Runs a checkpoint over slides; one backbone pass per tile per magnification."""

    def __init__(self, checkpoint: Checkpoint, config: EngineConfig | None = None):
        self.ckpt = checkpoint
        self.cfg = config or EngineConfig()
        self.device = pick_device(self.cfg.device)
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        self.precision = resolve_precision(self.cfg.precision, self.device)
        self.batch_size = int(self.cfg.batch_size) or (GPU_BATCH if self.device.type == "cuda" else 1)
        gpu = self.device.type == "cuda"
        if self.cfg.readers < 0 or self.cfg.writers not in (-1, 0, 1):
            raise ValueError(f"readers must be >= 0 and writers -1, 0 or 1, got {self.cfg.readers}, {self.cfg.writers}")
        #: tile-reading threads and whether finished blocks are written by a thread of their own
        self.readers = int(self.cfg.readers) or (max(1, min(4, (os.cpu_count() or 2) // 2)) if gpu else 1)
        self.threaded_writes = bool(self.cfg.writers == 1 or (self.cfg.writers == -1 and gpu))
        self.model = checkpoint.model.to(self.device).eval()
        if self.device.type == "cuda":  # (on CPU channels-last measured slower)
            self.model = self.model.to(memory_format=torch.channels_last)
        #: (n, batch size, tile shape) -> whether n tiles alone give the same bits as in a
        #: padded full batch on this device and precision (see ``_flush``)
        self._invariant: dict = {}
        self._window = ramp_window(self.cfg.core, self.cfg.margin)
        self._mask_cache: dict = {}
        self._grown: dict = {}

    # ------------------------------------------------------------------ helpers
    def tissues(self, names: Iterable | None) -> list[Tissue]:
        return resolve_tissues(list(names) if names else None, self.ckpt.tissues)

    def plans(self, source, tissues=None, region=None) -> list[MagPlan]:
        return make_plans(self.tissues(tissues), tuple(source.shapes[0]), source.mpp, region,
                          self.cfg.core, self.cfg.margin)

    #: above this many slide pixels to read for a whole-slide tissue mask (a slide with no
    #: usable pyramid), a region run judges background on the region and its halo only
    MASK_WHOLE_SLIDE_MAX_PX = 64e6

    def tissue_mask(self, source, region=None):
        """The slide's tissue mask; for a ``region`` of a slide whose mask would be costly
        to read whole, the mask of that region and a tile's halo around it."""
        from ..slides.tissue_mask import mask_read_pixels, tissue_mask

        box = None
        if region is not None and mask_read_pixels(source) > self.MASK_WHOLE_SLIDE_MAX_PX:
            x, y, w, h = region
            halo = int((self.cfg.core + 2 * self.cfg.margin) * max(t.mpp for t in self.ckpt.tissues) / float(source.mpp))
            box = (x - halo, y - halo, w + 2 * halo, h + 2 * halo)
        # keyed by the source object itself: an id() alone can be reused by the next image
        # once this one is freed (in-memory images segmented one after another), which
        # handed that image this one's mask
        key = (id(source), getattr(source, "path", None), box)
        hit = self._mask_cache.get(key)
        if hit is not None and hit[0]() is source:
            return hit[1]
        for k in [k for k, (ref, _) in self._mask_cache.items() if ref() is None]:
            del self._mask_cache[k]  # masks of sources that are gone
        mask = tissue_mask(source, box=box)
        try:
            ref = weakref.ref(source)
        except TypeError:  # a source that cannot be weakly referenced is kept alive instead
            ref = (lambda src=source: src)
        self._mask_cache[key] = (ref, mask)
        return mask

    def _autocast(self):
        return autocast(self.precision, self.device)

    @torch.inference_mode()
    def predict_tiles(self, tiles: np.ndarray, tissue_ids: Sequence[int], stat_masks=None) -> np.ndarray:
        """uint8 N x S x S x 3 -> foreground probabilities float32 N x T x S x S.

        ``stat_masks``: None, or one entry per tile, None (statistics over the whole
        tile) or a boolean S x S tissue mask (statistics over it; see
        ``EngineConfig.tissue_statistics``)."""
        x = torch.from_numpy(np.ascontiguousarray(tiles)).permute(0, 3, 1, 2)
        x = self.ckpt.normalize(x).to(self.device, non_blocking=True)
        if self.device.type == "cuda":
            x = x.contiguous(memory_format=torch.channels_last)
        sm = None
        if stat_masks is not None and any(m is not None for m in stat_masks):
            s = tiles.shape[1:3]
            sm = torch.from_numpy(np.stack([np.ones(s, np.float32) if m is None else np.asarray(m, np.float32)
                                            for m in stat_masks]))
            sm = sm[:, None].to(self.device, dtype=torch.float32)
        with self._autocast():
            feats = self.model.features(x) if sm is None else self.model.features(x, sm)
            logits = self.model.heads(feats, list(tissue_ids))
        p = torch.sigmoid((logits[:, :, 1] - logits[:, :, 0]).float())
        return p.cpu().numpy()

    def _predict_safely(self, batch, tissue_ids, stat_masks=None):
        """Predict, halving the batch on out-of-memory (results do not depend on batch size)."""
        try:
            if stat_masks is None:  # the call as it was before statistics masks (wrappers rely on it)
                return self.predict_tiles(batch, tissue_ids)
            return self.predict_tiles(batch, tissue_ids, stat_masks)
        except torch.OutOfMemoryError:
            if len(batch) == 1:
                raise
            if self.device.type == "cuda":
                torch.cuda.empty_cache()
            h = len(batch) // 2
            log.warning("out of memory with %d tiles; retrying in halves", len(batch))
            if stat_masks is None:
                return np.concatenate([self._predict_safely(batch[:h], tissue_ids),
                                       self._predict_safely(batch[h:], tissue_ids)])
            return np.concatenate([self._predict_safely(batch[:h], tissue_ids, stat_masks[:h]),
                                   self._predict_safely(batch[h:], tissue_ids, stat_masks[h:])])

    # ------------------------------------------------------------------ main loop
    def run(
        self,
        source,
        sink: Sink,
        tissues=None,
        region: tuple[int, int, int, int] | None = None,
        on_progress: ProgressFn | None = None,
        should_stop: StopFn | None = None,
        blocks: "Callable[[MagPlan], Iterable] | None" = None,
    ) -> RunReport:
        """Segment ``region`` (level-0 x, y, w, h; None = whole slide) into ``sink``.

        ``blocks(plan)``, when given, names the only blocks of each plan to produce (one
        part of a slide spread over several processes); a block's pixels do not depend
        on which others are produced with it."""
        t_start = time.perf_counter()
        rep = RunReport()
        plans = self.plans(source, tissues, region)
        mask = self.tissue_mask(source, region) if self.cfg.skip_background else None
        prepare = getattr(sink, "prepare_scores", None)
        if prepare is not None:
            prepare(plans)
        work = []
        for plan in plans:
            done = set(sink.done_blocks(plan))
            mine = plan.blocks if blocks is None else [b for b in plan.blocks if b in set(blocks(plan))]
            rep.blocks_resumed += sum(1 for b in mine if b in done)
            blocks_ = [b for b in mine if b not in done]
            tiles = sorted({(i + a, j + b) for i, j in blocks_ for a in (-1, 0, 1) for b in (-1, 0, 1)}
                           & set(plan.tiles))
            work.append((plan, blocks_, tiles))
            rep.tiles_total += len(tiles)
        n_done = 0
        try:
            for plan, todo, tiles in work:
                if not todo:
                    continue
                n_done = self._run_plan(source, sink, plan, todo, tiles, mask, rep, n_done, on_progress, should_stop)
        finally:  # cancelled or failed too: what was written is recorded, so a resumed run skips it
            flush = getattr(sink, "flush", None)
            if flush is not None:
                flush()
        rep.seconds = time.perf_counter() - t_start
        return rep

    def _run_plan(self, source, sink, plan, blocks, tiles, mask, rep, n_done, on_progress, should_stop):
        produce = set(blocks)
        names = [t.name for t in plan.tissues]
        ids = [t.id for t in plan.tissues]
        # how many tiles each block still waits for
        tile_set = set(tiles)
        waiting = {b: sum(1 for a in (-1, 0, 1) for c in (-1, 0, 1) if (b[0] + a, b[1] + c) in tile_set) for b in blocks}
        acc: dict = {}
        #: tiles read only in part (read_tile_pieces): tile -> mask of its unreadable pixels
        partial: dict = {}

        def block_state(b):
            st = acc.get(b)
            if st is None:
                y0, y1, x0, x1 = plan.block_bounds(*b)
                # probability sum, weight sum, unknown mask; then the same two sums for tiles
                # read only in part (allocated when one occurs)
                st = acc[b] = [np.zeros((len(ids), y1 - y0, x1 - x0), np.float32),
                               np.zeros((y1 - y0, x1 - x0), np.float32), np.zeros((y1 - y0, x1 - x0), bool),
                               None, None, None]  # + where the block's own tile shows white glass
            return st

        # finished blocks: thresholds, review scores and sink writes, here or in a writer thread
        wq: queue.Queue = queue.Queue(maxsize=4)  # bounded: memory stays flat if writes are slow
        write_error: list = []

        def write(b, st, gate):
            self._emit(sink, plan, b, st, names, gate)
            rep.blocks_written += 1

        def writer():
            while True:
                item = wq.get()
                if item is None:
                    return
                if not write_error:  # after a failure the rest is dropped; the run raises
                    try:
                        write(*item)
                    except BaseException as e:  # noqa: BLE001 - handed to the main loop
                        write_error.append(e)

        def check_writer():
            if write_error:
                raise write_error[0]

        def emit(b, gate):
            st = acc.pop(b)
            if wth is None:
                write(b, st, gate)
                return
            check_writer()
            wq.put((b, st, gate))

        wth = threading.Thread(target=writer, name="omniseg-write", daemon=True) if self.threaded_writes else None
        if wth is not None:
            wth.start()
        try:
            n_done = self._run_tiles(source, plan, tiles, mask, rep, n_done, on_progress, should_stop, ids, partial,
                                     block_state, produce, waiting, emit, check_writer)
        except BaseException:
            if wth is not None:  # blocks already finished are still written (cancelled runs too)
                wq.put(None)
                wth.join()
            raise
        if wth is not None:
            wq.put(None)
            wth.join()
        check_writer()
        if acc:  # cannot happen unless counts are inconsistent
            raise RuntimeError(f"internal error: {len(acc)} blocks left unfinished at {plan.magnification}x")
        return n_done

    def _run_tiles(self, source, plan, tiles, mask, rep, n_done, on_progress, should_stop, ids, partial,
                   block_state, produce, waiting, emit, check_writer):
        """Read, predict and blend ``tiles``; blocks go to ``emit`` as they finish."""

        def finish_tile(t, probs=None, failed=False, pixels=None):
            ti, tj = t
            oy, ox = plan.tile_origin(ti, tj)
            s = plan.tile_size
            lost = partial.pop(t, None) if probs is not None else None
            for a in (-1, 0, 1):
                for c in (-1, 0, 1):
                    b = (ti + a, tj + c)
                    if b not in produce:
                        continue
                    st = block_state(b)
                    if probs is not None:
                        y0, y1, x0, x1 = plan.block_bounds(*b)
                        ys0, ys1 = max(y0, oy), min(y1, oy + s)
                        xs0, xs1 = max(x0, ox), min(x1, ox + s)
                        if ys0 < ys1 and xs0 < xs1:
                            w = self._window[ys0 - oy : ys1 - oy, xs0 - ox : xs1 - ox]
                            tile_part = (slice(ys0 - oy, ys1 - oy), slice(xs0 - ox, xs1 - ox))
                            block_part = (slice(ys0 - y0, ys1 - y0), slice(xs0 - x0, xs1 - x0))
                            if lost is None:
                                st[0][(slice(None), *block_part)] += probs[(slice(None), *tile_part)] * w
                                st[1][block_part] += w
                            else:
                                # a tile read in part is only a fallback: wherever a fully read
                                # tile covers a pixel, that pixel is what a clean run gives; its
                                # unreadable pixels are unknown
                                if st[3] is None:
                                    st[3], st[4] = np.zeros_like(st[0]), np.zeros_like(st[1])
                                st[3][(slice(None), *block_part)] += probs[(slice(None), *tile_part)] * w
                                st[4][block_part] += w
                                st[2][block_part] |= lost[tile_part]
                    if pixels is not None and b == t and self.cfg.clear_glass:
                        y0, y1, x0, x1 = plan.block_bounds(*b)
                        core = pixels[y0 - oy : y1 - oy, x0 - ox : x1 - ox, :3]
                        # the darkest channel, as two element-wise minima (a reduction over the
                        # last axis of a strided view is about 10x slower)
                        st[5] = np.minimum(np.minimum(core[..., 0], core[..., 1]), core[..., 2]) > WHITE_GLASS
                    if failed and b == t:
                        st[2][:] = True
                    waiting[b] -= 1
                    if waiting[b] == 0:
                        gate = self._tissue_gate(mask, plan, b, source.mpp) if mask is not None else None
                        emit(b, gate)

        # which tiles hold tissue
        run_tiles = []
        for t in tiles:
            if mask is not None and not self._has_tissue(mask, plan, t, source.mpp):
                rep.tiles_skipped += 1
                finish_tile(t)
            else:
                run_tiles.append(t)
        n_done += len(tiles) - len(run_tiles)

        q: queue.Queue = queue.Queue(maxsize=max(1, self.cfg.prefetch) * self.batch_size)
        stop_reader = threading.Event()

        def read_one(t):
            t0 = time.perf_counter()
            try:
                item = (t, read_tile(source, plan, *t), None, None)
            except Exception as e:  # a corrupt tile must not end the run: read what can be read
                err = f"{type(e).__name__}: {e}"
                try:
                    img, lost = read_tile_pieces(source, plan, *t)
                except Exception:  # noqa: BLE001
                    img, lost = None, None
                item = (t, img, err, lost)
            return item, time.perf_counter() - t0

        def put(item):
            while not stop_reader.is_set():
                try:
                    q.put(item, timeout=0.1)
                    return
                except queue.Full:
                    continue

        def reader():
            # tiles are read by ``self.readers`` threads but handed on in their fixed order,
            # so the blending sums (and so the output bits) never depend on timing
            pool = ThreadPoolExecutor(self.readers, thread_name_prefix="omniseg-read") if self.readers > 1 else None
            pending: deque = deque()
            try:
                for t in run_tiles:
                    if stop_reader.is_set():
                        break
                    if pool is None:
                        pending.append(read_one(t))
                    else:
                        pending.append(pool.submit(read_one, t))
                        if len(pending) < 2 * self.readers:
                            continue
                    r = pending.popleft()
                    item, dt = r if pool is None else r.result()
                    rep.read_seconds += dt
                    put(item)
                while pending and not stop_reader.is_set():
                    item, dt = pending.popleft().result()
                    rep.read_seconds += dt
                    put(item)
            finally:
                if pool is not None:
                    pool.shutdown(wait=True, cancel_futures=True)
                q.put(None)

        th = threading.Thread(target=reader, name="omniseg-prefetch", daemon=True)
        th.start()
        finished = False
        try:
            while not finished:
                if should_stop is not None and should_stop():
                    raise SegmentationCancelled("segmentation cancelled; blocks already written are kept")
                batch, keys, smasks = [], [], []
                while len(batch) < self.batch_size:
                    item = q.get()
                    if item is None:
                        finished = True
                        break
                    t, img, err, lost = item
                    if err is not None and img is not None:
                        n_lost = int(lost[self.cfg.margin : -self.cfg.margin, self.cfg.margin : -self.cfg.margin].sum())
                        msg = (f"tile {t} at {plan.magnification}x could be read only in part ({err}); "
                               f"{n_lost} of its {self.cfg.core ** 2} core pixels marked unknown")
                        warnings.warn(msg, CorruptTileWarning, stacklevel=2)
                        rep.tiles_failed.append((plan.magnification, t[0], t[1], f"read in part: {err}"))
                        partial[t] = lost
                    elif err is not None:
                        msg = f"tile {t} at {plan.magnification}x could not be read ({err}); marked unknown"
                        warnings.warn(msg, CorruptTileWarning, stacklevel=2)
                        rep.tiles_failed.append((plan.magnification, t[0], t[1], err))
                        # keep row-major order: flush what we have first
                        if batch:
                            self._flush(batch, keys, ids, finish_tile, rep, smasks)
                            batch, keys, smasks = [], [], []
                        finish_tile(t, failed=True)
                        n_done += 1
                        continue
                    batch.append(img)
                    keys.append(t)
                    smasks.append(self._stat_mask(mask, plan, t, source.mpp) if mask is not None else None)
                if batch:
                    self._flush(batch, keys, ids, finish_tile, rep, smasks)
                    n_done += len(batch)
                check_writer()
                if on_progress is not None:
                    on_progress({"phase": "segment", "done": n_done, "total": rep.tiles_total,
                                 "magnification": plan.magnification, "blocks_written": rep.blocks_written})
        finally:
            stop_reader.set()
            # drain so the reader can exit
            while th.is_alive():
                try:
                    q.get(timeout=0.05)
                except queue.Empty:
                    pass
            th.join()
        return n_done

    def _flush(self, batch, keys, ids, finish_tile, rep, stat_masks=None):
        t0 = time.perf_counter()
        n = len(batch)
        if stat_masks is None or all(m is None for m in stat_masks):
            probs = self._predict_batch(np.stack(batch), ids)
        else:
            probs = self._predict_batch(np.stack(batch), ids, stat_masks)
        rep.model_seconds += time.perf_counter() - t0
        rep.tiles_run += len(batch)
        for t, p, img in zip(keys, probs, batch):
            finish_tile(t, p, pixels=img)

    def _predict_batch(self, x, ids, stat_masks=None):
        """Probabilities of the tiles ``x``, exactly as they come out in a full batch.

        Region and whole-slide runs must give bit-identical pixels, but a tile can meet
        different companions, or a shorter last batch, in each. Kernels may depend on the
        batch's shape (measured on CPU fp32: 1 and 3 tiles differ from 4 by up to 0.004
        in probability, 2 tiles do not), so a short batch is run unpadded only where this
        device gives the same bits for it: the first short batch of each size is run both
        ways and compared, and the answer kept for the process. Where they differ it is
        padded to the full batch (the fixed shape makes every tile's result independent
        of its companions). With one tile per batch, the CPU default, nothing is padded.
        """
        n, B = len(x), self.batch_size
        sm = None if stat_masks is None else list(stat_masks)
        if n >= B:
            return self._predict_safely(x, ids, sm)
        key = (n, B, x.shape[1:], tuple(ids))
        ok = self._invariant.get(key)
        if ok:
            return self._predict_safely(x, ids, sm)
        full = np.concatenate([x, np.zeros((B - n, *x.shape[1:]), x.dtype)])
        padded = self._predict_safely(full, ids, None if sm is None else sm + [None] * (B - n))[:n]
        if ok is None:
            self._invariant[key] = bool(np.array_equal(self._predict_safely(x, ids, sm), padded))
            log.info("batch of %d tiles %s a padded batch of %d on %s %s", n,
                     "matches" if self._invariant[key] else "differs from", B, self.device, self.precision)
        return padded

    def _has_tissue(self, mask, plan, t, level0_mpp) -> bool:
        from ..slides.tissue_mask import tile_has_tissue

        m, m_mpp = mask
        y, x, h, w = plan.level0_box(*t)
        return bool(tile_has_tissue(m, m_mpp, y, x, h, w, level0_mpp))

    def _grown_mask(self, mask):
        """The tissue mask grown by one of its pixels (16 um): what counts as tissue for
        clearing glass and for the statistics."""
        m = mask[0]
        grown = self._grown.get(id(m))
        if grown is None or grown[0] is not m:
            from ..slides.tissue_mask import grow

            grown = self._grown[id(m)] = (m, grow(m))
        return grown[1]

    def _stat_mask(self, mask, plan, t, level0_mpp):
        """Over tile ``t``: the tissue pixels its statistics are taken over, or None for
        the whole tile (``tissue_statistics`` off, or no glass in it). Pixels past the
        slide's edge (mirror padding) are not the slide's and are left out too."""
        ts = self.cfg.tissue_statistics
        if ts is None:
            ts = self.model.cfg.statistics == "tissue"
        if not ts:
            return None
        g = self._grown_mask(mask)
        m_mpp = mask[1]
        oy, ox = plan.tile_origin(*t)
        s = plan.tile_size
        r = plan.factor * float(level0_mpp) / float(m_mpp)  # mask pixels per plan pixel
        H, W = plan.shape
        ys, xs = np.arange(oy, oy + s), np.arange(ox, ox + s)
        iy = np.clip(((ys + 0.5) * r).astype(int), 0, g.shape[0] - 1)
        ix = np.clip(((xs + 0.5) * r).astype(int), 0, g.shape[1] - 1)
        sm = g[np.ix_(iy, ix)] & ((ys >= 0) & (ys < H))[:, None] & ((xs >= 0) & (xs < W))[None, :]
        if sm.all() or not sm.any():
            return None
        return sm

    def _tissue_gate(self, mask, plan, b, level0_mpp):
        """Over block ``b``: True where the tissue mask, grown by one of its pixels, holds
        tissue (None when glass is not cleared)."""
        if not self.cfg.clear_glass:
            return None
        m_mpp = mask[1]
        g = self._grown_mask(mask)
        y0, y1, x0, x1 = plan.block_bounds(*b)
        r = plan.factor * float(level0_mpp) / float(m_mpp)  # mask pixels per plan pixel
        ys = np.clip(((np.arange(y0, y1) + 0.5) * r).astype(int), 0, g.shape[0] - 1)
        xs = np.clip(((np.arange(x0, x1) + 0.5) * r).astype(int), 0, g.shape[1] - 1)
        return g[np.ix_(ys, xs)]

    def _emit(self, sink, plan, b, st, names, gate=None):
        acc, wsum, unknown, facc, fsum, white = st
        if gate is not None and white is not None:
            gate = gate | ~white  # only white pixels outside the tissue mask are glass
        with np.errstate(invalid="ignore", divide="ignore"):
            prob = np.where(wsum > 0, acc / np.maximum(wsum, 1e-12), 0.0)
            if facc is not None:  # pixels only tiles read in part covered
                only = (wsum <= 0) & (fsum > 0)
                prob = np.where(only, facc / np.maximum(fsum, 1e-12), prob)
        labels = {}
        for k, name in enumerate(names):
            lab = (prob[k] > self.ckpt.threshold(name)).astype(np.uint8)
            if gate is not None:
                lab &= gate
            lab[unknown] = UNKNOWN
            labels[name] = lab
        write_scores = getattr(sink, "write_scores", None)
        if write_scores is not None:  # review scores from the probabilities at hand (labels/review.py)
            from ..labels.review import block_scores

            # glass the gate cleared is certain background, whatever the head said there: a block of
            # faint probabilities over empty glass must not head the review queue
            sp = prob if gate is None else np.where(gate[None], prob, 0.0)
            write_scores(plan, b[0], b[1], block_scores(sp, labels, plan.tissues, unknown, self.ckpt.thresholds))
        sink.write_block(plan, b[0], b[1], labels)


# ---------------------------------------------------------------------- region sink
@dataclass
class RegionLabels:
    """One tissue's labels over a region, on that tissue's own pixel grid."""

    tissue: Tissue
    data: np.ndarray  #: uint8: 0 background, 1 tissue, 255 unknown
    mpp: float
    factor: float  #: level-0 pixels per pixel of ``data``
    origin: tuple[int, int]  #: (y, x) of data[0, 0] in the tissue's target grid

    @property
    def level0_offset(self) -> tuple[float, float]:
        """Level-0 pixel coordinates of the top-left corner of data[0, 0]."""
        return (self.origin[0] * self.factor, self.origin[1] * self.factor)

    def napari_transform(self) -> tuple[tuple[float, float], tuple[float, float]]:
        """(scale, translate) that place the labels over the level-0 image in napari
        (pixel centres: target pixel i covers level-0 [i*f, (i+1)*f))."""
        f = self.factor
        return (f, f), ((self.origin[0] + 0.5) * f - 0.5, (self.origin[1] + 0.5) * f - 0.5)


class MemorySink:
    """Collects the labels of a level-0 region in memory (for napari and tests)."""

    def __init__(self, region: tuple[int, int, int, int]):
        self.region = region
        self.result: dict[str, RegionLabels] = {}
        self._bounds: dict[int, tuple] = {}

    def done_blocks(self, plan):
        return set()

    def write_block(self, plan, bi, bj, labels):
        if plan.magnification not in self._bounds:
            self._bounds[plan.magnification] = region_in_plan(plan, self.region)
        ry0, ry1, rx0, rx1 = self._bounds[plan.magnification]
        y0, y1, x0, x1 = plan.block_bounds(bi, bj)
        ys0, ys1, xs0, xs1 = max(y0, ry0), min(y1, ry1), max(x0, rx0), min(x1, rx1)
        if ys0 >= ys1 or xs0 >= xs1:
            return
        for t in plan.tissues:
            r = self.result.get(t.name)
            if r is None:
                r = self.result[t.name] = RegionLabels(t, np.zeros((ry1 - ry0, rx1 - rx0), np.uint8), plan.mpp,
                                                       plan.factor, (ry0, rx0))
            r.data[ys0 - ry0 : ys1 - ry0, xs0 - rx0 : xs1 - rx0] = labels[t.name][ys0 - y0 : ys1 - y0, xs0 - x0 : xs1 - x0]


def segment_region(
    segmenter: Segmenter,
    source,
    region: tuple[int, int, int, int] | None = None,
    tissues=None,
    on_progress: ProgressFn | None = None,
    should_stop: StopFn | None = None,
) -> tuple[dict[str, RegionLabels], RunReport]:
    """Segment a level-0 region (x, y, w, h) into memory; None = the whole (small) slide."""
    if region is None:
        H, W = source.shapes[0]
        region = (0, 0, W, H)
    sink = MemorySink(region)
    rep = segmenter.run(source, sink, tissues, region, on_progress, should_stop)
    return sink.result, rep
