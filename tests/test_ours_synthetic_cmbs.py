"""On-the-fly synthetic CMBs of "ours" training: the physics bank, the insertion into a
normalised crop, and the sampler that uses them."""

from __future__ import annotations

import numpy as np
import pytest

pytest.importorskip("torch")

from cmbbench.methods.ours.preprocess import normalisation_stats, preprocess
from cmbbench.methods.ours.sampling import Case, PatchSampler
from cmbbench.methods.ours.synthetic_cmbs import CMBBank, insert_cmb, noise_sd
from cmbbench.synth.physics import apparent_diameter_mm


@pytest.fixture(scope="module")
def bank() -> CMBBank:
    return CMBBank(6, seed=3)


def test_bank_is_seeded_and_covers_both_sequences(bank):
    again = CMBBank(6, seed=3)
    assert len(bank) == len(again) >= 20
    for seq in ("SWI", "T2S"):
        assert bank.entries[seq], seq
        for a, b in zip(bank.entries[seq], again.entries[seq]):
            np.testing.assert_array_equal(a.magnitude, b.magnitude)
    other = CMBBank(6, seed=4)
    assert not np.array_equal(bank.entries["SWI"][0].magnitude,
                              other.entries["SWI"][0].magnitude)


def test_bank_entries_are_dark_blobs_with_their_label(bank):
    for entries in bank.entries.values():
        for e in entries:
            c = e.magnitude.shape[0] // 2
            assert e.label.any() and e.magnitude.min() < 0.7
            # the label is the connected dark core around the minimum, near the box centre
            lab_idx = np.argwhere(e.label)
            assert np.abs(lab_idx.mean(0) - c).max() <= 3
            assert (e.magnitude[e.label] <= 0.7 + 1e-6).all()
            # far from the source the signal is untouched
            assert np.allclose(e.magnitude[0, 0, 0], 1.0, atol=0.02)
            # the SWI phase mask only darkens
            assert (e.swi <= e.magnitude + 1e-6).all()
    # thicker slices dilute a CMB through partial volume: the thin-slice protocols' entries
    # are darker at their core than those of 4-5 mm slices for the same sequence family
    thin = [e.magnitude.min() for e in bank.entries["SWI"] if e.slice_mm <= 2.5]
    thick = [e.magnitude.min() for e in bank.entries["T2S"] if e.slice_mm >= 3.0]
    assert np.median(thin) < np.median(thick)


def test_bank_size_distribution_reaches_large_cmbs():
    bank = CMBBank(40, seed=0, uniform_share=1.0, range_mm=(1.5, 10.0))
    diam = np.array([e.diameter_mm for v in bank.entries.values() for e in v])
    assert diam.min() >= 1.5 and diam.max() <= 10.0
    assert (diam > 6.0).sum() >= 10
    # apparent size follows the target size (the generator's calibration caps the core's
    # susceptibility at 40 ppm, so a small core cannot bloom to a large target)
    app = np.array([apparent_diameter_mm(e.magnitude, (1, 1, 1))
                    for v in bank.entries.values() for e in v])
    assert np.median(app[diam > 6.0]) > np.median(app[diam < 2.5]) + 1.0
    assert app.max() > 6.0


def test_insert_cmb_multiplies_signal_keeps_noise_and_labels(bank):
    rng = np.random.default_rng(0)
    raw = 1000.0 + rng.normal(0, 40.0, (40, 40, 40))
    mask = np.ones(raw.shape, bool)
    med, scale = normalisation_stats(raw, mask)
    x = ((raw - med) / scale).astype(np.float32)
    lab = np.zeros(x.shape, np.uint8)
    sd = noise_sd(x, mask)
    assert sd == pytest.approx(40.0 / scale, rel=0.15)
    entry = max(bank.entries["T2S"], key=lambda e: e.label.sum())
    before = x.copy()
    insert_cmb(x, lab, entry, np.array([20, 20, 20]), offset=med / scale, noise=sd, swi=False,
               rng=rng)
    b = entry.magnitude.shape[0]
    box = (slice(20 - b // 2, 20 - b // 2 + b),) * 3
    # the signal (x + offset) is multiplied by the factor, up to the added-back noise
    expect = (before[box] + med / scale) * entry.magnitude - med / scale
    resid = x[box] - expect
    assert np.abs(resid[entry.magnitude >= 1 - 1e-6]).max() < 0.02
    assert np.std(resid[entry.magnitude < 0.3]) > 0.5 * sd
    assert (x + med / scale >= -1e-5).all()              # magnitude stays non-negative
    np.testing.assert_array_equal(lab[box] > 0, entry.label)
    assert lab.sum() == entry.label.sum()
    # a labelled voxel keeps its label; an SWI insertion is at least as dark
    x2, lab2 = before.copy(), np.zeros_like(lab)
    insert_cmb(x2, lab2, entry, np.array([20, 20, 20]), offset=med / scale, noise=0.0,
               swi=True, rng=rng)
    x3, lab3 = before.copy(), np.zeros_like(lab)
    insert_cmb(x3, lab3, entry, np.array([20, 20, 20]), offset=med / scale, noise=0.0,
               swi=False, rng=rng)
    assert (x2 <= x3 + 1e-5).all()


def test_insert_cmb_clips_at_the_crop_border(bank):
    x = np.zeros((12, 12, 12), np.float32)
    lab = np.zeros(x.shape, np.uint8)
    entry = max(bank.entries["SWI"], key=lambda e: e.label.sum())
    insert_cmb(x, lab, entry, np.array([1, 1, 11]), offset=5.0, noise=0.0, swi=False,
               rng=np.random.default_rng(0))
    assert x.min() < -1 and lab.any() and lab[11, 11, 0] == 0


def test_sampler_inserts_synthetic_cmbs_in_parenchyma(bank):
    rng = np.random.default_rng(1)
    img = rng.normal(0, 0.2, (60, 60, 60)).astype(np.float32)
    img[:, :, 40:] = 5.0                      # "CSF": too bright for a CMB
    mask = np.zeros(img.shape, bool)
    mask[5:55, 5:55, 5:55] = True
    case = Case("c", img, np.zeros(img.shape, np.uint8), mask, "SWI", intensity_offset=5.0,
                noise_sd=0.2, slice_mm=1.5)
    plain = PatchSampler([case], 32, pos_fraction=0.0, seed=2)
    assert all(plain.sample()[1].sum() == 0 for _ in range(10))
    sampler = PatchSampler([case], 32, pos_fraction=0.0, seed=2, bank=bank, synth_fraction=1.0,
                           synth_max=2, synth_margin=6)
    hits = 0
    for _ in range(20):
        patch, target = sampler.sample()
        if target.any():
            hits += 1
            assert patch[target > 0].mean() < -1.0          # dark where labelled
            assert patch.dtype == np.float32
    assert hits >= 10 and sampler.n_synthetic >= hits


def test_preprocess_records_the_normalisation_offset():
    rng = np.random.default_rng(0)
    img = np.zeros((60, 60, 60), np.float32)
    zz, yy, xx = np.mgrid[:60, :60, :60]
    head = (zz - 30) ** 2 + (yy - 30) ** 2 + (xx - 30) ** 2 < 24 ** 2
    img[head] = 800.0 + rng.normal(0, 30.0, head.sum())
    pre = preprocess(img, np.diag([1.0, 1.0, 1.0, 1.0]))
    # the offset maps a zero signal to image + offset == 0 in normalised units
    assert pre.image.shape == img.shape           # 1 mm RAS input: the working grid itself
    med, scale = normalisation_stats(img, pre.mask)
    assert pre.intensity_offset == pytest.approx(med / scale, rel=0.05)
    assert pre.intensity_offset > 5
