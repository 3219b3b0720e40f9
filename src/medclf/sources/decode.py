"""Decoding a source's records into the arrays every stage uses: one function for ingest and for the external
validation sets evaluate scores (`medclf.evaluation.external`), so both are decoded exactly alike.

`decode_all` decodes on every core (a process pool for file-backed records, threads for in-memory ones); each
worker dies with its parent, so a killed ingest leaves no orphan decoder. A record that cannot be decoded is not an
exception: its `Decoded.reason` says why (naming the file, and its manifest line where there is one), and the
caller quarantines it.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import multiprocessing
import os
import pickle
import signal
import sys
import threading
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np

from medclf.config import Ingest
from medclf.imaging.images import decode_bytes, fit_square, to_channels
from medclf.imaging.modality import file_colourfulness
from medclf.imaging.pixels import DecodeError, to_uint8
from medclf.imaging.privacy import redact
from medclf.sources.base import Record, SourceError


@dataclass
class Decoded:
    record: Record
    uri: str
    sha256: str = ""
    image: np.ndarray | None = None
    orig_shape: tuple[int, int, int] = (0, 0, 0)
    reason: str | None = None
    colourfulness: float | None = None
    """Of the file as stored (`medclf.imaging.modality`), for validate's `colour` check: the array may be grey
    already."""


def _decode_one(rec: Record, cfg: Ingest) -> Decoded:
    out = Decoded(record=rec, uri=redact(rec.uri, rec.patient_id))
    try:
        payload = rec.fetch()
        if isinstance(payload, np.ndarray):
            arr = payload if payload.ndim == 3 else payload[..., None]
            out.sha256 = hashlib.sha256(np.ascontiguousarray(arr).tobytes()).hexdigest()
            arr = to_uint8(arr)
            out.orig_shape = (int(arr.shape[0]), int(arr.shape[1]), int(arr.shape[2]))
        else:
            out.sha256 = hashlib.sha256(payload).hexdigest()
            # the source knows its kind: a raster file is never sniffed for DICOM here
            arr, out.orig_shape = decode_bytes(
                payload,
                cfg.max_image_pixels,
                kind="dicom" if rec.kind == "dicom" else "image",
                channels=cfg.channels,
                size=cfg.image_size,
            )
        out.colourfulness = file_colourfulness(payload if isinstance(payload, bytes) else None, arr)
        out.image = fit_square(to_channels(arr, cfg.channels), cfg.image_size, cfg.resize)
    except DecodeError as err:
        out.reason = str(err)
    except (SourceError, OSError) as err:
        at = f" (listed at {rec.where})" if rec.where else ""  # e.g. the manifest and its line
        out.reason = redact(f"cannot read: {err}{at}", rec.patient_id)
    return out


def _picklable(obj: object) -> bool:
    try:
        pickle.dumps(obj)
        return True
    except Exception:  # noqa: BLE001 - closures (synthetic source) cannot cross a process boundary
        return False


def _watch_parent(parent: int) -> None:
    while os.getppid() == parent:
        time.sleep(0.5)
    os._exit(1)


def _die_with_parent(parent: int) -> None:
    """Pool initializer: a decode worker dies with ingest (a SIGKILLed ingest cannot shut its pool down).

    Linux: a parent-death signal (prctl PR_SET_PDEATHSIG); elsewhere, or if prctl fails, a watchdog thread
    polling the parent pid. Either way, a parent that died before this ran is caught by the pid check.
    """
    armed = False
    if sys.platform.startswith("linux"):
        import ctypes

        with contextlib.suppress(OSError, AttributeError):
            armed = ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGKILL, 0, 0, 0) == 0  # PR_SET_PDEATHSIG
    if os.getppid() != parent:
        os._exit(1)
    if not armed:
        threading.Thread(target=_watch_parent, args=(parent,), daemon=True, name="parent-watchdog").start()


def decode_all(records: list[Record], cfg: Ingest) -> list[Decoded]:
    """Decode on every core.

    File-backed records go to a process pool (decode + resize hold the GIL part of
    the time, so threads alone leave cores idle); in-memory sources use threads.
    """
    from tqdm import tqdm

    workers = cfg.workers or os.cpu_count() or 1
    use_procs = workers > 1 and len(records) >= 256 and _picklable(records[0])
    if use_procs:
        ctx = multiprocessing.get_context("fork")
        pool: ProcessPoolExecutor | ThreadPoolExecutor = ProcessPoolExecutor(
            workers, mp_context=ctx, initializer=_die_with_parent, initargs=(os.getpid(),)
        )
        chunk = max(1, min(64, len(records) // (workers * 8)))
    else:
        pool, chunk = ThreadPoolExecutor(max_workers=workers), 1
    with pool:
        it = pool.map(functools.partial(_decode_one, cfg=cfg), records, chunksize=chunk)
        return list(tqdm(it, total=len(records), desc="ingest: decode", unit="img", mininterval=1.0, disable=None))
