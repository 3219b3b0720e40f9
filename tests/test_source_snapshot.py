"""Issue 22, row 4: ingest reads one consistent source, or fails naming what changed while it read.

The source is listed and stat'ed before ingest reads it and again after it has decoded every file (and once
more just before the commit). A file added, removed or rewritten in between fails the run with `SourceChanged`
(transient: the flow's retry reads the source again) naming the file, and nothing is written: the previous
dataset and its reports stay byte-identical. So DVC, which hashes the source after the command, never records
files the manifest lacks (`dvc.lock` is written only when the command succeeded).

The concurrent writer is real (a real file created, deleted or rewritten in the source folder, on the real
filesystem), triggered when ingest decodes its first image; ingest itself is not mocked.
"""

from __future__ import annotations

import glob
import re
import shutil
from pathlib import Path

import pandas as pd
import pytest

from medclf.imaging.privacy import redact
from medclf.sources import decode
from medclf.sources.base import SourceChanged
from medclf.stages import ingest
from tests.conftest import ROOT
from tests.test_ingest import tree_digest

DEMO_REGEX = r"^(pt[0-9a-f]{10})_"


def demo_folder(root: Path, per_class: int = 12) -> Path:
    """`per_class` real chest X-rays (data/demo, CC BY 4.0) per class folder."""
    for cls in ("NORMAL", "PNEUMONIA"):
        (root / cls).mkdir(parents=True, exist_ok=True)
        for f in sorted(glob.glob(str(ROOT / f"data/demo/batch1/{cls}/*.jpeg")))[:per_class]:
            shutil.copy2(f, root / cls / Path(f).name)
    return root


def _settings(make_settings, root: Path):
    return make_settings(
        {
            "ingest": {
                "source": {"kind": "folder", "uri": str(root), "patient_id_regex": DEMO_REGEX},
                "image_size": 32,
                "workers": 1,
            }
        }
    )


def _outputs(settings) -> dict[str, str]:
    return {str(d): tree_digest(d) for d in (settings.paths.ingest_dir, settings.paths.reports_dir / "ingest")}


def _staging(settings) -> list[str]:
    return sorted(
        p.name
        for d in (settings.paths.ingest_dir.parent, settings.paths.reports_dir)
        if d.exists()
        for p in d.iterdir()
        if p.name.endswith((".staging", ".old")) or ".commit" in p.name
    )


def _on_first_decode(monkeypatch, action) -> list[int]:
    """Run `action` (a real write to the source) when ingest starts decoding, then decode as usual."""
    real, calls = decode._decode_one, []

    def hooked(rec, cfg):
        if not calls:
            calls.append(1)
            action()
        return real(rec, cfg)

    monkeypatch.setattr(decode, "_decode_one", hooked)
    return calls


EXTRA = sorted(glob.glob(str(ROOT / "data/demo/batch1/NORMAL/*.jpeg")))[40]


@pytest.mark.parametrize("kind", ["added", "removed", "changed"])
def test_source_changed_while_ingest_reads_fails_clearly_and_writes_nothing(tmp_path, make_settings, monkeypatch, kind):
    root = demo_folder(tmp_path / "raw")
    settings = _settings(make_settings, root)
    ingest.run(settings)  # a good previous dataset
    before = _outputs(settings)
    last = max((root / "PNEUMONIA").iterdir())  # decoded last: still unread when the writer runs
    victim = {"added": root / "NORMAL" / Path(EXTRA).name, "removed": last, "changed": last}[kind]

    def write() -> None:
        if kind == "added":
            shutil.copy(EXTRA, victim)
        elif kind == "removed":
            victim.unlink()
        else:  # rewritten in place: other bytes, same name
            victim.write_bytes(Path(EXTRA).read_bytes())

    calls = _on_first_decode(monkeypatch, write)
    with pytest.raises(SourceChanged) as err:
        ingest.run(settings)
    assert calls
    msg = str(err.value)
    rel, pid = victim.relative_to(root).as_posix(), re.match(DEMO_REGEX, victim.name).group(1)
    assert f"{kind}: {redact(rel, pid)}" in msg and pid not in msg, msg  # named as the manifest names it
    assert str(root) in msg and "nothing of this run is kept" in msg, msg
    assert SourceChanged.transient  # the flow retries it
    assert _outputs(settings) == before  # the previous dataset and its reports, byte for byte
    assert _staging(settings) == []
    assert not (settings.paths.reports_dir / "ingest" / "failed_run.json").exists()

    monkeypatch.undo()
    summary = ingest.run(settings)  # the retry reads the source as it is now, consistently
    manifest = pd.read_parquet(settings.paths.ingest_dir / "manifest.parquet")
    names = {Path(u).name for u in manifest["source_uri"]}
    on_disk = {redact(p.name, re.match(DEMO_REGEX, p.name).group(1)) for p in root.rglob("*.jpeg")}
    assert names == on_disk and summary["quarantined"] == 0


def test_outputs_inside_the_source_folder_are_not_a_change_of_the_source(tmp_path, make_settings):
    """A manifest beside the project's outputs (the source's folder holds data/ingest, reports/ and .cache/):
    the staging directories, the commit and the lock that ingest itself writes there are not the source, so
    neither the first run nor the second (with a previous dataset to swap out) fails as SourceChanged."""
    for i, f in enumerate(sorted(glob.glob(str(ROOT / "data/demo/batch1/*/*_1.jpeg")))[::9][:24]):
        shutil.copy(f, tmp_path / f"img{i:02d}_{Path(f).parent.name}.jpeg")
    rows = [f"{p.name},{p.stem.split('_', 1)[1]},P{i}" for i, p in enumerate(sorted(tmp_path.glob("img*.jpeg")))]
    (tmp_path / "labels.csv").write_text("path,label,patient_id\n" + "\n".join(rows) + "\n")
    s = make_settings(
        {"ingest": {"source": {"kind": "manifest", "uri": str(tmp_path / "labels.csv")}, "image_size": 32}}
    )
    assert ingest.run(s)["images"] == 24
    assert ingest.run(s)["changes"]["unchanged"] == 24
