"""Drift statistics and detectors: hand-computed values, planted drift, stationary streams."""

from __future__ import annotations

import math
from collections.abc import Callable

import numpy as np
import pytest

from model.config_base import ConfigError
from model.drift import (
    ALARM_CHANNEL,
    Adwin0,
    Adwin0Config,
    DistributionConfig,
    DistributionMonitor,
    DriftAlarm,
    DriftDetector,
    ItemReference,
    LengthShift,
    LengthShiftConfig,
    PageHinkley,
    PageHinkleyConfig,
    Prequential,
    js_divergence,
    ks_statistic,
    length_counts,
    psi,
    rank_gain,
)

# --------------------------------------------------------------------------- statistics


def test_psi_matches_the_formula_by_hand() -> None:
    # p = (0.2, 0.3, 0.5), q = (0.4, 0.4, 0.2)
    want = (0.2 * math.log(2.0) + 0.1 * math.log(0.4 / 0.3) - 0.3 * math.log(0.2 / 0.5))
    assert psi([2, 3, 5], [4, 4, 2]) == pytest.approx(want, rel=1e-12)
    assert psi([4, 4, 2], [2, 3, 5]) == pytest.approx(want, rel=1e-12)  # symmetric
    assert psi([1, 2, 3], [10, 20, 30]) == 0.0  # scale-free: proportions only


def test_psi_smooths_zero_counts_with_eps() -> None:
    # q has nothing in bin 1: its proportion becomes eps, p's zero in bin 2 as well.
    eps = 1e-3
    got = psi([1, 1, 0], [1, 0, 1], eps=eps)
    want = (0.5 - 0.5) * 0 + (eps - 0.5) * math.log(eps / 0.5) + (0.5 - eps) * math.log(0.5 / eps)
    assert got == pytest.approx(want, rel=1e-12) and math.isfinite(got)
    assert psi([1, 1, 0], [1, 0, 1], eps=1e-6) > got  # smaller eps, larger penalty


def test_js_divergence_is_bounded_symmetric_and_hand_computed() -> None:
    assert js_divergence([5, 0], [0, 2]) == 1.0
    assert js_divergence([1, 3], [2, 6]) == 0.0
    p, q = np.array([0.25, 0.75]), np.array([0.5, 0.5])
    m = (p + q) / 2
    want = 0.5 * np.sum(p * np.log2(p / m)) + 0.5 * np.sum(q * np.log2(q / m))
    assert js_divergence([1, 3], [1, 1]) == pytest.approx(want, rel=1e-12)
    assert js_divergence([1, 1], [1, 3]) == pytest.approx(want, rel=1e-12)
    assert js_divergence([1, 0, 0], [1, 1, 0]) == pytest.approx(js_divergence([1, 0], [1, 1]))


def test_ks_statistic_by_hand() -> None:
    # CDFs: p (0.25, 0.5, 1.0), q (0, 0.5, 1.0): largest gap 0.25.
    assert ks_statistic([1, 1, 2], [0, 2, 2]) == pytest.approx(0.25)
    assert ks_statistic([3, 0, 0], [0, 0, 7]) == 1.0
    assert ks_statistic([2, 2], [1, 1]) == 0.0


@pytest.mark.parametrize("fn", [psi, js_divergence, ks_statistic])
def test_divergences_refuse_empty_negative_or_mismatched_counts(fn: Callable) -> None:
    with pytest.raises(ValueError, match="no counts"):
        fn([0, 0], [1, 1])
    with pytest.raises(ValueError, match="no counts"):
        fn([1, 1], [0, 0])
    with pytest.raises(ValueError, match=">= 0"):
        fn([1, -1], [1, 1])
    with pytest.raises(ValueError, match="same categories"):
        fn([1, 1], [1, 1, 1])


def test_rank_gain_and_prequential_windows() -> None:
    assert rank_gain(2, 3) == (1.0, pytest.approx(1 / math.log2(3)))
    assert rank_gain(4, 3) == (0.0, 0.0)
    with pytest.raises(ValueError, match="1-based"):
        rank_gain(0, 3)
    m = Prequential(k=2, window=3)
    assert m.hr is None and m.ndcg is None and m.n == 0
    for r in [1, 2, None, 1]:  # the window keeps the last 3: ranks 2, None, 1
        m.update(r)
    assert m.n == 3 and m.hr == pytest.approx(2 / 3)
    assert m.ndcg == pytest.approx((1 / math.log2(3) + 1.0) / 3)
    assert m.last_hit == 1.0


def test_length_counts_clips_long_sessions() -> None:
    assert length_counts([2, 2, 5, 50], max_length=5) == [0, 0, 2, 0, 0, 2]
    with pytest.raises(ValueError, match="negative"):
        length_counts([-1])


# --------------------------------------------------------------------------- alarm contract


def test_alarm_round_trips_and_rejects_malformed_payloads() -> None:
    assert ALARM_CHANNEL == "streamrec:drift-alarm"
    alarm = DriftAlarm("oov_rate", 0.5, 0.2, None, 1_700_000_000_123, 800)
    assert DriftAlarm.from_json(alarm.to_json().decode()) == alarm
    with pytest.raises(ValueError, match=r"not a streamrec\.drift-alarm/1"):
        DriftAlarm.from_json(b'{"detector": "x"}')
    good = alarm.to_json().decode()
    with pytest.raises(ValueError, match="'samples'"):
        DriftAlarm.from_json(good.replace('"samples":800', '"samples":true'))
    with pytest.raises(ValueError, match="'ts_ms'"):
        DriftAlarm.from_json(good.replace(',"ts_ms":1700000000123', ""))


# --------------------------------------------------------------------------- configs


def test_configs_reject_unknown_keys_and_bad_values() -> None:
    with pytest.raises(ConfigError, match="did you mean 'threshold'"):
        PageHinkleyConfig.from_dict({"treshold": 3})
    assert PageHinkleyConfig.from_dict({"threshold": 3}).threshold == 3
    bad: list[tuple[Callable[[], object], str]] = [
        (lambda: PageHinkleyConfig(direction="sideways"), "direction"),  # type: ignore[arg-type]
        (lambda: PageHinkleyConfig(alpha=0.0), "alpha"),
        (lambda: PageHinkleyConfig(min_samples=True), "min_samples"),  # type: ignore[arg-type]
        (lambda: Adwin0Config(max_window=10, min_split=8), "2 \\* min_split"),
        (lambda: DistributionConfig(window=10, min_samples=20), "cannot exceed"),
        (lambda: DistributionConfig(js_threshold=2.0), "js_threshold"),
        (lambda: LengthShiftConfig(ks_threshold=0.0), "ks_threshold"),
    ]
    for make, message in bad:
        with pytest.raises(ConfigError, match=message):
            make()


# --------------------------------------------------------------------------- metric detectors

DETECTORS: dict[str, Callable[[], DriftDetector]] = {
    "page_hinkley": lambda: PageHinkley(PageHinkleyConfig()),
    "adwin0": lambda: Adwin0(Adwin0Config()),
}


def _hits(rng: np.random.Generator, n: int, p: float) -> list[float]:
    return (rng.random(n) < p).astype(float).tolist()


def _first_alarm(det: DriftDetector, stream: list[float]) -> int | None:
    for i, x in enumerate(stream):
        det.update(x)
        if det.drift_detected:
            return i
    return None


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_stays_quiet_on_a_stationary_stream(name: str) -> None:
    for seed, p in [(0, 0.1), (1, 0.3), (2, 0.5)]:
        stream = _hits(np.random.default_rng(seed), 10_000, p)
        assert _first_alarm(DETECTORS[name](), stream) is None, (seed, p)


@pytest.mark.parametrize("name", DETECTORS)
def test_detector_fires_soon_after_an_abrupt_drop(name: str) -> None:
    rng = np.random.default_rng(7)
    stream = _hits(rng, 2000, 0.4) + _hits(rng, 2000, 0.1)
    at = _first_alarm(DETECTORS[name](), stream)
    assert at is not None and 2000 <= at < 2600, at


@pytest.mark.parametrize("name", DETECTORS)
def test_reset_gives_a_fresh_detector(name: str) -> None:
    rng = np.random.default_rng(3)
    stream = _hits(rng, 1500, 0.5) + _hits(rng, 1500, 0.05)
    fresh, used = DETECTORS[name](), DETECTORS[name]()
    _first_alarm(used, stream)
    used.reset()
    assert not used.drift_detected
    assert _first_alarm(used, stream) == _first_alarm(fresh, stream)


def test_page_hinkley_direction_and_min_samples() -> None:
    rng = np.random.default_rng(11)
    rise = _hits(rng, 1000, 0.1) + _hits(rng, 1000, 0.5)
    assert _first_alarm(PageHinkley(PageHinkleyConfig(direction="down")), rise) is None
    up = _first_alarm(PageHinkley(PageHinkleyConfig(direction="up")), rise)
    assert up is not None and 1000 <= up < 1400
    # A drop right at the start is not reported before min_samples updates.
    drop = [1.0] * 20 + [0.0] * 500
    cfg = PageHinkleyConfig(delta=0.0, threshold=1.0, min_samples=100)
    assert _first_alarm(PageHinkley(cfg), drop) == 99


def test_page_hinkley_restarts_after_a_detection() -> None:
    ph = PageHinkley(PageHinkleyConfig(delta=0.0, threshold=1.0, min_samples=1))
    for x in [1.0, 1.0, 1.0, 0.0, 0.0]:
        ph.update(x)
    assert ph.drift_detected and ph.n == 5
    ph.update(0.0)
    assert not ph.drift_detected and ph.n == 1 and ph.statistic == 0.0


def test_adwin0_drops_the_old_regime_on_a_cut() -> None:
    rng = np.random.default_rng(5)
    det = Adwin0(Adwin0Config(max_window=1000))
    for x in rng.normal(0.0, 1.0, 800):
        det.update(float(x))
    assert det.width == 800
    cut = None
    for i, x in enumerate(rng.normal(3.0, 1.0, 400)):
        det.update(float(x))
        if det.drift_detected:
            cut = i
            break
    assert cut is not None and cut < 64
    assert det.width < 200 and det.mean is not None and det.mean > 1.5  # mostly the new regime


# --------------------------------------------------------------------------- item distribution


def _zipf(n_items: int, s: float = 1.1) -> np.ndarray:
    w = 1.0 / np.arange(1, n_items + 1) ** s
    return w / w.sum()


def _reference(n_items: int = 1000, n_bins: int = 20) -> tuple[ItemReference, np.ndarray]:
    probs = _zipf(n_items)
    counts = np.round(probs * 200_000)
    return ItemReference.from_counts([f"i{n}" for n in range(n_items)], counts, n_bins), probs


def test_reference_bins_hold_about_equal_mass_and_heavy_items_alone() -> None:
    ref = ItemReference.from_counts(["a", "b", "c", "d", "e"], [5, 1, 1, 1, 2], n_bins=4)
    # Sorted a(5) e(2) b c d(1 each) of 10: mass before = 0, 5, 7, 8, 9 -> raw bins 0, 2, 2, 3, 3.
    assert ref.bin_of == {"a": 0, "e": 1, "b": 1, "c": 2, "d": 2}
    assert ref.expected.tolist() == [5.0, 3.0, 2.0]
    ints = ItemReference.from_counts([7, 8], [1, 1], n_bins=2)  # ids compared as str
    assert ints.bin_of == {"7": 0, "8": 1}
    _, probs = _reference()
    big, _ = _reference(n_bins=10)
    share = big.expected / big.expected.sum()
    assert big.n_bins <= 10 and share.max() <= probs[0] + 0.1 + 1e-9


def test_distribution_monitor_quiet_on_the_training_distribution() -> None:
    ref, probs = _reference()
    mon = DistributionMonitor(ref, DistributionConfig(window=3000, min_samples=500))
    rng = np.random.default_rng(0)
    for i in rng.choice(len(probs), size=6000, p=probs):
        mon.update(f"i{i}")
        assert not mon.drift_detected
    assert mon.n == 3000 and mon.oov_rate == 0.0
    assert mon.psi is not None and mon.psi < 0.05 and mon.js is not None and mon.js < 0.01


def test_distribution_monitor_fires_on_a_changed_item_distribution() -> None:
    ref, probs = _reference()
    mon = DistributionMonitor(ref, DistributionConfig(window=3000, min_samples=500))
    rng = np.random.default_rng(1)
    for i in rng.choice(len(probs), size=500, p=probs[::-1]):  # the tail became the head
        mon.update(f"i{i}")
    assert set(mon.triggered) == {"item_psi", "item_js"} and mon.drift_detected
    assert mon.psi is not None and mon.psi > 1.0 and mon.oov_rate == 0.0


def test_distribution_monitor_oov_rate_and_window_sliding() -> None:
    ref, _ = _reference()
    mon = DistributionMonitor(ref, DistributionConfig(window=100, min_samples=50))
    assert mon.statistics() == {"item_psi": None, "item_js": None, "oov_rate": None}
    assert not mon.drift_detected  # empty window
    for n in range(40):
        mon.update(f"new{n}")
    assert mon.oov_rate == 1.0 and mon.psi is None and not mon.drift_detected  # < min_samples
    for n in range(20):
        mon.update(f"i{n % 3}")
    assert mon.oov_rate == pytest.approx(40 / 60) and "oov_rate" in mon.triggered
    for _ in range(100):  # pushes every OOV item out of the window
        mon.update("i0")
    assert mon.n == 100 and mon.oov_rate == 0.0 and "oov_rate" not in mon.triggered


# --------------------------------------------------------------------------- session lengths


def _geometric_lengths(rng: np.random.Generator, n: int, mean: float) -> list[int]:
    return rng.geometric(1.0 / mean, n).tolist()


def test_length_shift_quiet_when_lengths_keep_their_distribution() -> None:
    rng = np.random.default_rng(0)
    shift = LengthShift(length_counts(_geometric_lengths(rng, 20_000, 4.0)), LengthShiftConfig())
    for n in _geometric_lengths(rng, 3000, 4.0):
        shift.update(n)
        assert not shift.drift_detected
    assert shift.ks is not None and shift.ks < 0.06
    assert shift.mean_shift is not None and abs(shift.mean_shift) < 0.4


def test_length_shift_fires_when_sessions_get_longer() -> None:
    rng = np.random.default_rng(1)
    shift = LengthShift(length_counts(_geometric_lengths(rng, 20_000, 4.0)), LengthShiftConfig())
    for n in _geometric_lengths(rng, 200, 8.0):
        shift.update(n)
    assert shift.drift_detected and shift.ks is not None and shift.ks > 0.25
    assert shift.mean_shift is not None and shift.mean_shift > 2.5


def test_length_shift_edge_cases() -> None:
    with pytest.raises(ValueError, match="at least one session"):
        LengthShift([0, 0, 0])
    shift = LengthShift([0, 1, 1], LengthShiftConfig(window=2, min_samples=1, max_length=2))
    assert shift.ks is None and shift.mean_shift is None and not shift.drift_detected
    for n in [1, 9, 9]:  # the window keeps (9, 9), counted at max_length 2
        shift.update(n)
    assert shift.n == 2 and shift.ks == pytest.approx(0.5) and shift.mean_shift == 0.5
