"""augment: seeded transforms, class balancing, the stage's outputs, and the online batch feeder."""

from __future__ import annotations

import hashlib
import json

import numpy as np
import pytest

from medclf.config import PRESETS, AugmentPolicy, ConfigError, settings_from_dict
from medclf.imaging.augmentation import apply_policy, balance_classes, balance_plan, random_affine, warp_affine
from medclf.pipeline import invoke


def _images(n: int = 40, size: int = 24, c: int = 1, seed: int = 0) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, size, size, c), dtype=np.uint8)


def _readonly(a: np.ndarray) -> np.ndarray:
    a = a.copy()
    a.flags.writeable = False
    return a


def _digest(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


# --------------------------------------------------------------------------- transforms
def test_warp_identity_and_flip_are_exact():
    x = _images(3, 20, 3)
    ident = np.tile(np.array([[1, 0, 0], [0, 1, 0]], np.float32), (3, 1, 1))
    assert np.array_equal(warp_affine(x, ident), x)
    hflip = np.tile(np.array([[-1, 0, 19], [0, 1, 0]], np.float32), (3, 1, 1))
    assert np.array_equal(warp_affine(x, hflip), x[:, :, ::-1])
    shift = np.tile(np.array([[1, 0, 5], [0, 1, 0]], np.float32), (3, 1, 1))  # out[x] = in[x + 5]
    out = warp_affine(x, shift)
    assert np.array_equal(out[:, :, :15], x[:, :, 5:]) and not out[:, :, 15:].any()  # outside -> black


def test_chest_xray_preset_never_flips_vertically():
    pol = PRESETS["chest_xray"]
    assert not pol.vertical_flip and not pol.horizontal_flip
    m = random_affine(np.random.default_rng(0), 2000, pol, 32, 32)
    det = m[:, 0, 0] * m[:, 1, 1] - m[:, 0, 1] * m[:, 1, 0]
    assert (det > 0).all() and (m[:, 1, 1] > 0).all()  # never mirrored, never upside down
    # behaviour on images: a bright top half stays on top under every draw
    img = np.zeros((200, 32, 32, 1), np.uint8)
    img[:, :16] = 200
    out = apply_policy(img, pol, np.random.default_rng(1)).astype(float)
    assert (out[:, :14].mean(axis=(1, 2, 3)) > out[:, 18:].mean(axis=(1, 2, 3)) + 100).all()
    # dermoscopy really does flip both ways, so the check above can fail
    m2 = random_affine(np.random.default_rng(0), 2000, PRESETS["dermoscopy"], 32, 32)
    assert (m2[:, 0, 0] * m2[:, 1, 1] - m2[:, 0, 1] * m2[:, 1, 0] < 0).mean() > 0.3


def test_apply_policy_is_seeded_pure_and_changes_images():
    x = _readonly(_images(16))
    before = x.copy()
    pol = PRESETS["chest_xray"]
    a = apply_policy(x, pol, np.random.default_rng(5))
    b = apply_policy(x, pol, np.random.default_rng(5))
    c = apply_policy(x, pol, np.random.default_rng(6))
    assert np.array_equal(a, b) and not np.array_equal(a, c)
    assert a.dtype == np.uint8 and a.shape == x.shape and not np.array_equal(a, x)
    assert np.array_equal(x, before)
    assert np.array_equal(apply_policy(x, PRESETS["none"], np.random.default_rng(0)), x)


def test_contrast_and_brightness_follow_the_policy():
    x = np.full((50, 8, 8, 1), 100, np.uint8)
    x[:, :4] = 60
    out = apply_policy(x, AugmentPolicy(brightness=0.2), np.random.default_rng(0)).astype(int)
    shift = out - x
    assert (shift == shift[:, :1, :1]).all()  # brightness shifts each image uniformly
    assert np.abs(shift).max() <= 0.2 * 255 + 1 and np.abs(shift).max() > 10
    out = apply_policy(x, AugmentPolicy(contrast=0.5), np.random.default_rng(0)).astype(float)
    assert np.allclose(out.mean(axis=(1, 2, 3)), x.mean(axis=(1, 2, 3)), atol=1.0)  # around the mean
    spread = out[:, 5, 5, 0] - out[:, 0, 0, 0]
    assert spread.min() >= 40 * 0.5 - 1 and spread.max() <= 40 * 1.5 + 1 and spread.std() > 2


# --------------------------------------------------------------------------- balancing
@pytest.mark.parametrize("ratio", [0.5, 0.8, 1.0])
def test_balancing_reaches_the_target_ratio(ratio):
    y = np.array([0] * 30 + [1] * 7 + [2] * 12)
    x = _readonly(_images(len(y)))
    res = balance_classes(x, _readonly(y), PRESETS["chest_xray"], ratio, 3, seed=1)
    counts = np.bincount(res.labels, minlength=3)
    assert counts[0] == 30 and counts.min() / counts.max() >= ratio - 1e-9
    assert (counts[1:] <= np.ceil(ratio * 30)).all()  # no more than needed
    n = len(y)
    assert np.array_equal(res.images[:n], x) and np.array_equal(res.labels[:n], y)  # originals first, untouched
    assert not res.is_synthetic[:n].any() and res.is_synthetic[n:].all()
    assert np.array_equal(res.labels[n:], y[res.source_row[n:]])  # a synthetic image keeps its source's label
    assert not any(np.array_equal(res.images[i], x[res.source_row[i]]) for i in range(n, len(res.labels)))


def test_balancing_is_deterministic_chunk_independent_and_leaves_input_alone():
    y = _readonly(np.array([0] * 25 + [1] * 6))
    x = _readonly(_images(len(y), seed=3))
    x_before, y_before = x.copy(), y.copy()
    a = balance_classes(x, y, PRESETS["dermoscopy"], 1.0, 2, seed=9, chunk=4)
    b = balance_classes(x, y, PRESETS["dermoscopy"], 1.0, 2, seed=9, chunk=256)
    c = balance_classes(x, y, PRESETS["dermoscopy"], 1.0, 2, seed=10)
    assert np.array_equal(a.images, b.images) and np.array_equal(a.source_row, b.source_row)
    assert not np.array_equal(a.images, c.images)
    assert np.array_equal(x, x_before) and np.array_equal(y, y_before)
    # every minority original is used before any is reused
    assert np.bincount(a.source_row[31:], minlength=31)[25:].min() >= 3


def test_balance_plan_rejects_a_missing_class():
    with pytest.raises(ValueError, match=r"class index\(es\) \[1\]"):
        balance_plan(np.array([0, 0, 2]), 1.0, 3)


def test_overrides_apply_and_bad_keys_fail_at_parse_time():
    s = settings_from_dict(
        {"augment": {"preset": "chest_xray", "overrides": {"rotation_deg": 3, "vertical_flip": True}}}
    )
    assert s.augment.policy().rotation_deg == 3 and s.augment.policy().vertical_flip
    with pytest.raises(ConfigError, match="vertical_flipp"):
        settings_from_dict({"augment": {"overrides": {"vertical_flipp": True}}})
    with pytest.raises(ConfigError, match="rotation_deg"):
        settings_from_dict({"augment": {"overrides": {"rotation_deg": 500}}})
    with pytest.raises(ConfigError, match="unknown preset"):
        settings_from_dict({"augment": {"preset": "chest-xray"}})


# --------------------------------------------------------------------------- the stage
def test_augment_stage_outputs_and_determinism(make_settings):

    s = make_settings({"augment": {"target_ratio": 0.9, "preview_n": 8}})
    invoke("ingest", s)
    ing = s.paths.ingest_dir
    ingest_digests = {p.name: _digest(p) for p in ing.iterdir()}
    res = invoke("augment", s)
    out = s.paths.augment_dir
    x, y = np.load(out / "train_images.npy"), np.load(out / "train_labels.npy")
    syn, src = np.load(out / "train_is_synthetic.npy"), np.load(out / "train_source_row.npy")
    x0, y0 = np.load(ing / "train_images.npy"), np.load(ing / "train_labels.npy")
    counts = np.bincount(y)
    assert counts.min() / counts.max() >= 0.9 and res["ratio_after"] >= 0.9 > res["ratio_before"]
    assert np.array_equal(x[: len(y0)], x0) and not syn[: len(y0)].any() and syn[len(y0) :].all()
    assert res["synthetic"] == int(syn.sum()) == len(y) - len(y0) > 0
    assert np.array_equal(y[syn], y0[src[syn]])
    assert json.loads((out / "augment.json").read_text())["policy"]["vertical_flip"] is False
    preview = s.paths.reports_dir / "augment" / "preview.png"
    assert preview.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and preview.stat().st_size > 5000
    from PIL import Image

    w, h = Image.open(preview).size
    assert w > 600 and h > 150
    assert {p.name: _digest(p) for p in ing.iterdir()} == ingest_digests  # ingest is never touched
    first = {p.name: _digest(p) for p in out.iterdir()}
    invoke("augment", s)
    assert {p.name: _digest(p) for p in out.iterdir()} == first  # same params -> byte-identical output
    assert not [p for p in out.parent.iterdir() if "staging" in p.name or p.name.endswith(".old")]


def test_augment_stage_without_balancing_and_missing_input(make_settings):
    from medclf.stages.augment import AugmentError

    s = make_settings({"augment": {"balance": False}})
    with pytest.raises(AugmentError, match="train_images.npy: missing; run `medclf ingest` first"):
        invoke("augment", s)
    invoke("ingest", s)
    res = invoke("augment", s)
    assert res["synthetic"] == 0 and res["counts_before"] == res["counts_after"]


# --------------------------------------------------------------------------- online feeding
def test_online_batches_fixed_shape_seeded_and_padded():
    from medclf.imaging.augmentation import AugmentedBatches

    y = np.array([0] * 30 + [1] * 11)
    x = _readonly(_images(len(y)))
    ds = AugmentedBatches(x, y, 2, 8, policy=PRESETS["chest_xray"], seed=3, class_weight={0: 0.5, 1: 2.0}, workers=2)
    try:
        assert len(ds) == 6
        batches = [ds[i] for i in range(len(ds))]
        assert all(b[0].shape == (8, 24, 24, 1) and b[0].dtype == np.uint8 for b in batches)
        assert all(b[1].shape == (8, 2) for b in batches)
        assert ds.batches_served == 6 and ds.wait_seconds > 0
        again = ds.batch(0, 2)
        assert all(np.array_equal(a, b) for a, b in zip(again, batches[2], strict=True))  # pure in (epoch, idx)
        ds.on_epoch_end()
        assert ds.epoch == 1 and not np.array_equal(ds[0][0], batches[0][0])  # a new epoch, new draws
        rows = ds.order(0)
        assert len(rows) == 48 and set(rows[:41]) == set(range(41))  # every image, then padding
        w = np.concatenate([b[2] for b in batches])
        lab = np.concatenate([b[1] for b in batches]).argmax(1)
        assert np.allclose(w, np.where(lab == 1, 2.0, 0.5))
    finally:
        ds.close()
    val = AugmentedBatches(x, y, 2, 8, shuffle=False, workers=0)
    xb, _, wb = val[5]
    assert np.array_equal(xb[:1], x[40:41]) and wb[:1].tolist() == [1.0] and not wb[1:].any()  # padding weighs 0
    assert np.array_equal(val[0][0], x[:8])  # no transforms without a policy
