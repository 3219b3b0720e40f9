"""What changed between two ingests, the raw-data hash from dvc.lock, and the honest git commit tag."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pandas as pd
import pytest
import yaml

from medclf.imaging.changes import describe, diff_manifests
from medclf.infra.tracking import git_commit, raw_data_version


def manifest(rows: list[tuple[str, str | None, str]]) -> pd.DataFrame:
    return pd.DataFrame(rows, columns=["source_uri", "sha256", "label"])


BASE = [
    ("raw/normal/a.png", "h1", "normal"),
    ("raw/normal/b.png", "h2", "normal"),
    ("raw/opacity/c.png", "h3", "opacity"),
    ("raw/opacity/d.png", None, "opacity"),
]


def test_first_ingest_counts_everything_as_added():
    ch = diff_manifests(None, manifest(BASE))
    assert ch["first"] and ch["added"] == 4
    assert describe(ch) == "first ingest: 4 images"


def test_no_change():
    ch = diff_manifests(manifest(BASE), manifest(BASE))
    assert {k: ch[k] for k in ("added", "removed", "changed", "relabelled", "moved")} == dict.fromkeys(
        ("added", "removed", "changed", "relabelled", "moved"), 0
    )
    assert ch["unchanged"] == 4 and describe(ch) == "no image changed"


@pytest.mark.parametrize(
    "new, expect",
    [
        (BASE + [("raw/normal/e.png", "h5", "normal")], {"added": 1}),
        (BASE[1:], {"removed": 1}),
        ([("raw/normal/a.png", "h9", "normal")] + BASE[1:], {"changed": 1}),
        # moved between class folders with the same bytes: a relabel, not one removal and one addition
        ([("raw/opacity/a.png", "h1", "opacity")] + BASE[1:], {"relabelled": 1}),
        # a manifest row edited: same path and bytes, other label
        ([("raw/normal/a.png", "h1", "opacity")] + BASE[1:], {"relabelled": 1}),
        # renamed within its class
        ([("raw/normal/a2.png", "h1", "normal")] + BASE[1:], {"moved": 1}),
    ],
)
def test_each_kind_of_change_is_counted_once(new, expect):
    ch = diff_manifests(manifest(BASE), manifest(new))
    counts = {k: ch[k] for k in ("added", "removed", "changed", "relabelled", "moved")}
    assert counts == {**dict.fromkeys(counts, 0), **expect}, ch
    (kind,) = expect
    assert ch["examples"][kind]
    assert ch["unchanged"] == len(BASE) - (kind != "added")


def test_describe_reads_like_a_sentence():
    ch = diff_manifests(
        manifest(BASE),
        manifest(
            [("raw/opacity/a.png", "h1", "opacity")]
            + BASE[1:]
            + [(f"raw/normal/n{i}.png", f"n{i}", "normal") for i in range(11)]
        ),
    )
    assert describe(ch) == "+11 images, 1 relabelled"


def test_raw_data_version_reads_the_ingest_dependency(tmp_path):
    lock = tmp_path / "dvc.lock"
    lock.write_text(
        yaml.safe_dump(
            {
                "schema": "2.0",
                "stages": {
                    "ingest": {
                        "cmd": "medclf ingest",
                        "deps": [
                            {"path": "src/medclf/stages/ingest.py", "md5": "code"},
                            {"path": "data/raw/xray", "md5": "abc.dir", "size": 10, "nfiles": 3},
                        ],
                    }
                },
            }
        )
    )
    assert raw_data_version("data/raw/xray/", lock) == {
        "path": "data/raw/xray/",
        "md5": "abc.dir",
        "nfiles": 3,
        "size": 10,
    }
    assert raw_data_version("data/raw/other", lock) == {}
    assert raw_data_version("data/raw/xray", tmp_path / "missing.lock") == {}


def _git(cwd: Path, *args: str) -> None:
    subprocess.run(["git", *args], cwd=cwd, check=True, capture_output=True)


def test_git_commit_is_dirty_for_code_changes_but_not_for_the_run_record(tmp_path):
    _git(tmp_path, "init", "-q", "-b", "main")
    _git(tmp_path, "config", "user.email", "t@example.invalid")
    _git(tmp_path, "config", "user.name", "t")
    (tmp_path / "params.yaml").write_text("a: 1\n")
    (tmp_path / "data.dvc").write_text("outs: []\n")
    _git(tmp_path, "add", "-A")
    _git(tmp_path, "commit", "-qm", "init")
    head = git_commit(tmp_path)
    assert head and not head.endswith("-dirty")
    # what DVC's autostage does on a fresh clone: a new dvc.lock staged, a .dvc file rewritten
    (tmp_path / "dvc.lock").write_text("schema: '2.0'\n")
    _git(tmp_path, "add", "dvc.lock")
    (tmp_path / "data.dvc").write_text("outs: [x]\n")
    assert git_commit(tmp_path) == head
    (tmp_path / "params.yaml").write_text("a: 2\n")
    assert git_commit(tmp_path) == f"{head}-dirty"


def test_quarantined_rows_are_counted_as_quarantined_not_added():
    """Issue 22, row 11b: ingest's manifest lists quarantined inputs too (status `quarantined`); they were counted
    as images "added" to the dataset. Only usable images are added, removed or changed; the rest is quarantined."""

    def with_status(rows: list[tuple[str, str | None, str, str]]) -> pd.DataFrame:
        return pd.DataFrame(rows, columns=["source_uri", "sha256", "label", "status"])

    ok = [(*r, "ok") for r in BASE]
    first = diff_manifests(None, with_status(ok + [("raw/normal/bad.png", None, "normal", "quarantined")]))
    assert first["added"] == 4 and first["quarantined"] == 1, first
    assert describe(first) == "first ingest: 4 images, 1 quarantined"
    # the same source again, plus one more unreadable file and one good image that now fails to decode
    again = with_status(
        ok[1:]
        + [
            ("raw/normal/a.png", None, "normal", "quarantined"),
            ("raw/normal/bad.png", None, "normal", "quarantined"),
            ("raw/normal/bad2.png", None, "normal", "quarantined"),
        ]
    )
    ch = diff_manifests(with_status(ok + [("raw/normal/bad.png", None, "normal", "quarantined")]), again)
    counts = {k: ch[k] for k in ("added", "removed", "changed", "relabelled", "moved", "quarantined")}
    assert counts == {"added": 0, "removed": 0, "changed": 0, "relabelled": 0, "moved": 0, "quarantined": 3}, ch
    assert ch["unchanged"] == 3 and ch["examples"]["quarantined"][0] == "raw/normal/a.png"
    assert describe(ch) == "3 quarantined"
    # a file that was quarantined and is now readable joins the dataset: added
    fixed = diff_manifests(again, with_status(ok))
    assert fixed["added"] == 1 and fixed["quarantined"] == 0 and fixed["removed"] == 0, fixed


def test_ingest_change_report_counts_a_corrupt_file_as_quarantined(tmp_path, make_settings):
    """The real ingest, on real chest X-rays with one truncated JPEG: its change report says 1 quarantined,
    not 1 image more; a second run on the same source reports nothing added or removed."""
    import shutil

    from medclf.stages import ingest
    from tests.test_source_snapshot import DEMO_REGEX, demo_folder

    root = demo_folder(tmp_path / "raw", per_class=20)
    first = min((root / "NORMAL").iterdir())
    shutil.copy(first, root / "NORMAL" / "ptffffffffff_1.jpeg")
    (root / "NORMAL" / "ptffffffffff_1.jpeg").write_bytes(first.read_bytes()[:300])  # truncated: quarantined
    s = make_settings(
        {"ingest": {"source": {"kind": "folder", "uri": str(root), "patient_id_regex": DEMO_REGEX}, "image_size": 32}}
    )
    summary = ingest.run(s)
    assert summary["quarantined"] == 1 and summary["images"] == 40
    ch = summary["changes"]
    assert ch["first"] and ch["added"] == 40 and ch["quarantined"] == 1, ch
    again = ingest.run(s)["changes"]
    assert again["added"] == 0 and again["removed"] == 0 and again["quarantined"] == 1, again
    assert again["unchanged"] == 40
