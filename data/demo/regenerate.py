"""Rebuild the embedded chest X-ray demo set from the Kermany et al. pediatric chest X-rays.

Source: Kermany, Zhang, Goldbaum et al., "Labeled Optical Coherence Tomography (OCT) and Chest X-Ray Images
for Classification", Mendeley Data v2 (2018), doi:10.17632/rscbjbr9sj.2, CC BY 4.0.

Reads `<shared>/train/{NORMAL,PNEUMONIA}` and writes a deterministic, patient-level subset:

    <out>/batch1/{NORMAL,PNEUMONIA}/<pseudonym>_<k>.jpeg   the default training set
    <out>/batch2/{NORMAL,PNEUMONIA}/<pseudonym>_<k>.jpeg   new patients only (~20 % of batch 1)
    <out>/MANIFEST.sha256                                  `sha256sum -c MANIFEST.sha256` checks every image

Patients are ordered by a keyed hash of their id (no RNG, so the order never depends on a library version)
and taken whole, class by class, until each class reaches its target. Each image is converted to 8-bit
grayscale, resized to 128 px with Lanczos and saved as a baseline JPEG with fixed settings, so a rerun with
the same Pillow version writes identical bytes. Byte-identical copies in the source (a few patients have the
same file twice under two names) are kept once, and no two written images are identical.

Output names are pseudonymised, so the release's patient ids (`person<ID>`, `IM-<ID>`, `NORMAL2-IM-<ID>`) are
not redistributed in git: `<pseudonym>` is `pt` + the first 10 hex digits of
sha256(b"medclf-demo/v1:" + release patient id), and `<k>` = 1, 2, ... numbers that patient's images within the
batch and class in the sorted order of their original names. The patient stays parseable by
`^(pt[0-9a-f]{10})_`; the variant (bacteria/virus) is not in the name.

    python data/demo/regenerate.py [--shared ../shared/data/chest_xray] [--out OUT_DIR]
"""

from __future__ import annotations

import argparse
import hashlib
import io
import re
import shutil
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

PATIENT_REGEX = re.compile(r"^(person\d+|(?:NORMAL2-)?IM-\d+)")  # release (source) names
PSEUDONYM_PREFIX = b"medclf-demo/v1:"
OUTPUT_PATIENT_REGEX = re.compile(r"^(pt[0-9a-f]{10})_")  # what the pipeline reads from the written names
CLASSES: tuple[str, ...] = ("NORMAL", "PNEUMONIA")
IMAGE_EXTENSIONS: frozenset[str] = frozenset({".jpeg", ".jpg", ".png"})
SEED = "medclf-chest-xray-demo-v1"
SIZE = 128
JPEG_QUALITY = 90
BATCH1_PER_CLASS = 600
BATCH2_PER_CLASS = 120
MAX_BYTES = 8_000_000  # the whole demo folder (images, manifest, README, script), `du -sb`

HERE = Path(__file__).resolve().parent
DEFAULT_SHARED = HERE.parents[1].parent / "shared" / "data" / "chest_xray"


@dataclass(frozen=True)
class Patient:
    pid: str
    label: str
    files: tuple[Path, ...]


def train_root(shared: Path) -> Path:
    """Accept `.../chest_xray`, `.../chest_xray/train` or the `shared` folder itself."""
    for cand in (shared / "train", shared / "data" / "chest_xray" / "train", shared):
        if all((cand / c).is_dir() for c in CLASSES):
            return cand
    raise SystemExit(f"{shared}: no train/{{{','.join(CLASSES)}}} folders found (use --shared)")


def patients(root: Path, label: str) -> list[Patient]:
    """The class's patients; a byte-identical copy of an earlier file (by sorted name) is left out."""
    by_pid: dict[str, list[Path]] = defaultdict(list)
    seen: set[str] = set()
    for f in sorted((root / label).iterdir()):
        if f.suffix.lower() not in IMAGE_EXTENSIONS or f.name.startswith("."):
            continue
        m = PATIENT_REGEX.match(f.name)
        if m is None:
            raise SystemExit(f"{f}: no patient id in the file name")
        digest = hashlib.sha256(f.read_bytes()).hexdigest()
        if digest in seen:
            continue
        seen.add(digest)
        by_pid[m.group(1)].append(f)
    return [Patient(pid, label, tuple(fs)) for pid, fs in by_pid.items()]


def pseudonym(pid: str) -> str:
    """`pt` + 10 hex digits of sha256(PSEUDONYM_PREFIX + pid).

    A one-way pseudonym of an already-public release pseudonym (the Kermany release's patient ids are not
    real identifiers, but we do not redistribute them verbatim): the original id is not in git, and the
    patient grouping is preserved because every image of one patient gets the same pseudonym.
    Unkeyed on purpose (reproducible from the public release), so it is not meant to resist re-identification.
    """
    return "pt" + hashlib.sha256(PSEUDONYM_PREFIX + pid.encode("utf-8")).hexdigest()[:10]


def check_pseudonyms(pids: set[str]) -> None:
    """No two different release ids may map to the same pseudonym, and every name must match the regex."""
    by_pseudo: dict[str, str] = {}
    for pid in sorted(pids):
        ps = pseudonym(pid)
        assert OUTPUT_PATIENT_REGEX.match(f"{ps}_1.jpeg"), ps
        other = by_pseudo.setdefault(ps, pid)
        if other != pid:
            raise SystemExit(f"pseudonym collision on {ps}: two release patients share it")


def order_key(p: Patient) -> str:
    return hashlib.sha256(f"{SEED}:{p.label}:{p.pid}".encode()).hexdigest()


def take(pool: list[Patient], target: int) -> tuple[list[Patient], list[Patient]]:
    """Whole patients from the front of `pool` until `target` images are reached: (taken, rest)."""
    n = 0
    i = 0
    while i < len(pool) and n < target:
        n += len(pool[i].files)
        i += 1
    if n < target:
        raise SystemExit(f"{pool[0].label if pool else '?'}: only {n} images left, {target} needed")
    return pool[:i], pool[i:]


def encode(src: Path) -> bytes:
    with Image.open(src) as im:
        im.load()
        gray = im.convert("L")
    w, h = gray.size
    scale = SIZE / max(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    small = gray.resize(size, Image.Resampling.LANCZOS)
    arr = np.asarray(small, dtype=np.uint8)  # drops any metadata; fixed 8-bit content
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="JPEG", quality=JPEG_QUALITY, optimize=True, progressive=False)
    return buf.getvalue()


def folder_bytes(path: Path) -> int:
    """Apparent size like `du -sb` (files and directories, `__pycache__` excluded)."""
    total = 0
    for p in path.rglob("*"):
        if "__pycache__" in p.parts:
            continue
        total += p.lstat().st_size
    return total + path.lstat().st_size


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description="Rebuild the embedded chest X-ray demo set (see the module docstring).")
    ap.add_argument(
        "--shared",
        type=Path,
        default=DEFAULT_SHARED,
        help="the Kermany chest_xray folder (holding train/NORMAL, train/PNEUMONIA)",
    )
    ap.add_argument("--out", type=Path, default=HERE, help="output folder (default: this script's folder)")
    args = ap.parse_args(argv)
    root = train_root(args.shared)
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)

    batches: dict[str, list[Patient]] = {"batch1": [], "batch2": []}
    pools = {label: patients(root, label) for label in CLASSES}
    # Over the whole source (both classes), not just the selection: no collision whatever gets picked.
    check_pseudonyms({p.pid for pool in pools.values() for p in pool})
    for label in CLASSES:
        pool = sorted(pools[label], key=order_key)
        b1, rest = take(pool, BATCH1_PER_CLASS)
        b2, _ = take(rest, BATCH2_PER_CLASS)
        batches["batch1"] += b1
        batches["batch2"] += b2

    seen: dict[str, str] = {}  # sha256 -> written path: no image is written twice, in any class
    manifest: list[tuple[str, str]] = []
    for batch, pats in batches.items():
        shutil.rmtree(out / batch, ignore_errors=True)
        for p in sorted(pats, key=lambda p: (p.label, p.pid)):
            (out / batch / p.label).mkdir(parents=True, exist_ok=True)
            # p.files is in sorted order of the original names, so k is stable across reruns.
            for k, src in enumerate(p.files, start=1):
                rel = f"{batch}/{p.label}/{pseudonym(p.pid)}_{k}.jpeg"
                if not OUTPUT_PATIENT_REGEX.match(Path(rel).name) or (out / rel).exists():
                    raise SystemExit(f"{rel}: bad or repeated output name")
                data = encode(src)
                digest = hashlib.sha256(data).hexdigest()
                if digest in seen:
                    raise SystemExit(f"{rel}: same bytes as {seen[digest]}")
                seen[digest] = rel
                (out / rel).write_bytes(data)
                manifest.append((digest, rel))
    manifest.sort(key=lambda t: t[1])
    (out / "MANIFEST.sha256").write_text("".join(f"{d}  {r}\n" for d, r in manifest), encoding="utf-8")

    print(f"{'batch':8} {'class':10} {'images':>6} {'patients':>8}")
    for batch, pats in batches.items():
        for label in CLASSES:
            sel = [p for p in pats if p.label == label]
            print(f"{batch:8} {label:10} {sum(len(p.files) for p in sel):6d} {len(sel):8d}")
    size = folder_bytes(out)
    print(f"{len(manifest)} images, folder {size:,} bytes (limit {MAX_BYTES:,})")
    if size > MAX_BYTES:
        print("error: the demo folder is over its size limit", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
