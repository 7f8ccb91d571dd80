"""Drift statistics and detectors: pure, numeric, no I/O (``docs/drift.md``).

Detectors follow river's shape: ``update(x)`` takes one observation and the
read-only ``drift_detected`` says whether the latest update signalled drift.
What to do about it (retrain, page someone) is decided elsewhere: the online
monitor (``serving/monitor.py``) publishes a :class:`DriftAlarm` on
:data:`ALARM_CHANNEL` and the retrain scheduler reacts.

Top to bottom: the alarm contract, pure statistics (:func:`psi`,
:func:`js_divergence`, :func:`ks_statistic`, :func:`rank_gain`), configs, then
the detectors: :class:`PageHinkley` and :class:`Adwin0` on a metric stream,
:class:`Prequential` (sliding HR@k / NDCG@k), :class:`DistributionMonitor`
(live item ids against the training window's) and :class:`LengthShift`
(session lengths against the training window's).

>>> ph = PageHinkley(PageHinkleyConfig(delta=0.0, threshold=1.5, min_samples=1, alpha=1.0))
>>> for x in [1, 1, 1, 1, 0, 0, 0]:
...     ph.update(x)
>>> ph.drift_detected, round(ph.statistic, 3)  # 0.8 + 0.667 + 0.571: the mean falls in
(True, 2.038)
"""

from __future__ import annotations

import dataclasses
import json
import math
from collections import deque
from collections.abc import Iterable, Mapping, Sequence
from typing import Any, Literal, Protocol

import numpy as np

from model.config_base import ConfigError, from_dict

__all__ = [
    "ALARM_CHANNEL", "ALARM_FORMAT", "DETECTOR_NAMES", "HR_PAGE_HINKLEY", "ITEM_JS", "ITEM_PSI",
    "OOV_RATE", "SESSION_LENGTHS_INFO_KEY", "SESSION_LENGTH_KS", "Adwin0", "Adwin0Config",
    "DistributionConfig", "DistributionMonitor", "DriftAlarm", "DriftDetector", "ItemReference",
    "LengthShift", "LengthShiftConfig", "PageHinkley", "PageHinkleyConfig", "Prequential",
    "js_divergence", "ks_statistic", "length_counts", "psi", "rank_gain",
]

# --------------------------------------------------------------------------- the alarm contract

#: Redis pub/sub channel the online monitor publishes alarms on (default of
#: ``STREAMREC_MONITOR_ALARM_CHANNEL``).
ALARM_CHANNEL = "streamrec:drift-alarm"
ALARM_FORMAT = "streamrec.drift-alarm/1"
#: Detector names that appear in alarms and in the ``detector`` metric label.
HR_PAGE_HINKLEY = "online_hr_page_hinkley"
ITEM_PSI = "item_psi"
ITEM_JS = "item_js"
OOV_RATE = "oov_rate"
SESSION_LENGTH_KS = "session_length_ks"
DETECTOR_NAMES = (HR_PAGE_HINKLEY, ITEM_PSI, ITEM_JS, OOV_RATE, SESSION_LENGTH_KS)
#: Key of a checkpoint's ``info`` holding the training window's session-length
#: counts (a list, index = length; see :func:`length_counts`).
SESSION_LENGTHS_INFO_KEY = "session_lengths"


@dataclasses.dataclass(frozen=True)
class DriftAlarm:
    """One alarm: which detector, its statistic and threshold, for which model version, when.

    ``ts_ms`` is the wall-clock time (ms since epoch) the monitor raised it;
    ``samples`` how many observations the statistic is based on.

    >>> a = DriftAlarm("item_psi", 0.41, 0.25, "v3", 1_700_000_000_000, 5000)
    >>> a.to_json()
    b'{"format":"streamrec.drift-alarm/1","detector":"item_psi","statistic":0.41,"threshold":0.25,"model_version":"v3","ts_ms":1700000000000,"samples":5000}'
    >>> DriftAlarm.from_json(a.to_json()) == a
    True
    """

    detector: str
    statistic: float
    threshold: float
    model_version: str | None
    ts_ms: int
    samples: int

    def to_json(self) -> bytes:
        doc = {"format": ALARM_FORMAT, **dataclasses.asdict(self)}
        return json.dumps(doc, separators=(",", ":"), allow_nan=False).encode()

    @classmethod
    def from_json(cls, raw: bytes | str) -> DriftAlarm:
        """Parse a published alarm; a wrong format or field raises ``ValueError`` saying which."""
        doc = json.loads(raw)
        if not isinstance(doc, dict) or doc.get("format") != ALARM_FORMAT:
            raise ValueError(f"not a {ALARM_FORMAT} message: {str(raw)[:200]}")
        types: dict[str, tuple[type, ...]] = {
            "detector": (str,), "statistic": (int, float), "threshold": (int, float),
            "model_version": (str, type(None)), "ts_ms": (int,), "samples": (int,)}
        for name, ok in types.items():
            if name not in doc or isinstance(doc[name], bool) or not isinstance(doc[name], ok):
                raise ValueError(f"drift alarm field {name!r} missing or of the wrong type: "
                                 f"{doc.get(name)!r}")
        return cls(doc["detector"], float(doc["statistic"]), float(doc["threshold"]),
                   doc["model_version"], doc["ts_ms"], doc["samples"])


# --------------------------------------------------------------------------- pure statistics


def _proportions(counts: Sequence[float] | np.ndarray, name: str) -> np.ndarray:
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim != 1 or (c < 0).any() or not np.isfinite(c).all():
        raise ValueError(f"{name} must be a 1-d vector of finite counts >= 0")
    total = c.sum()
    if total <= 0:
        raise ValueError(f"{name} has no counts: a divergence needs at least one observation")
    return c / total


def _pair(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray
          ) -> tuple[np.ndarray, np.ndarray]:
    pp, qq = _proportions(p, "p"), _proportions(q, "q")
    if pp.shape != qq.shape:
        raise ValueError(f"p and q must count the same categories, got {pp.size} and {qq.size}")
    return pp, qq


def psi(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray,
        eps: float = 1e-4) -> float:
    """Population stability index of counts ``q`` (live) against ``p`` (reference).

    ``sum_i (q_i - p_i) * ln(q_i / p_i)`` over proportions. Smoothing: a zero
    proportion (on either side) is replaced by ``eps`` before the sum, so a
    category seen on one side only adds ``~ q_i * ln(q_i / eps)`` instead of
    infinity. Symmetric in ``p`` and ``q``; 0 for equal proportions.

    >>> round(psi([1, 1], [1, 3]), 4)  # 0.25 ln 2 + 0.25 ln 1.5
    0.2747
    >>> psi([2, 4], [1, 2])
    0.0
    >>> round(psi([1, 0], [1, 1], eps=0.01), 4)  # -0.5 ln 0.5 + 0.49 ln 50
    2.2635
    """
    if not 0 < eps < 1:
        raise ValueError(f"eps must be in (0, 1), got {eps}")
    pp, qq = _pair(p, q)
    pp, qq = np.where(pp > 0, pp, eps), np.where(qq > 0, qq, eps)
    return float(np.sum((qq - pp) * np.log(qq / pp)))


def js_divergence(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Jensen-Shannon divergence of two count vectors, in bits (0 equal .. 1 disjoint).

    ``JS = (KL(p || m) + KL(q || m)) / 2`` with ``m = (p + q) / 2``. No
    smoothing is needed: ``m_i > 0`` wherever ``p_i > 0`` or ``q_i > 0``, and
    terms with a zero proportion are 0 (``0 log 0 = 0``).

    >>> js_divergence([1, 0], [0, 1]), js_divergence([3, 1], [6, 2])
    (1.0, 0.0)
    >>> round(js_divergence([1, 1], [1, 0]), 4)  # (0.5 log2(2/3) + 0.5 log2 2 + log2(4/3)) / 2
    0.3113
    """
    pp, qq = _pair(p, q)
    m = (pp + qq) / 2

    def kl(a: np.ndarray) -> float:
        nz = a > 0
        return float(np.sum(a[nz] * np.log2(a[nz] / m[nz])))

    return min(1.0, max(0.0, (kl(pp) + kl(qq)) / 2))


def ks_statistic(p: Sequence[float] | np.ndarray, q: Sequence[float] | np.ndarray) -> float:
    """Two-sample Kolmogorov-Smirnov statistic of two histograms over the same ordered support.

    ``D = max_x |F_p(x) - F_q(x)|`` with ``F`` the empirical CDFs; index ``i``
    of each vector counts the value ``i`` (e.g. sessions of length ``i``).

    >>> ks_statistic([0, 1, 1, 0], [0, 0, 1, 1])
    0.5
    """
    pp, qq = _pair(p, q)
    return float(np.max(np.abs(np.cumsum(pp) - np.cumsum(qq))))


def rank_gain(rank: int | None, k: int) -> tuple[float, float]:
    """``(hit, ndcg)`` at ``k`` of one click whose item was shown at 1-based ``rank``.

    ``hit`` is 1 when ``rank <= k``; ``ndcg = 1 / log2(rank + 1)`` then (one
    relevant item: the ideal DCG is 1), else both are 0. ``None`` = not shown.

    >>> rank_gain(1, 10), rank_gain(3, 10), rank_gain(11, 10), rank_gain(None, 10)
    ((1.0, 1.0), (1.0, 0.5), (0.0, 0.0), (0.0, 0.0))
    """
    if k < 1:
        raise ValueError(f"k must be >= 1, got {k}")
    if rank is None or rank > k:
        return 0.0, 0.0
    if rank < 1:
        raise ValueError(f"rank is 1-based, got {rank}")
    return 1.0, 1.0 / math.log2(rank + 1)


def length_counts(lengths: Iterable[int], max_length: int = 200) -> list[int]:
    """Histogram of session lengths (index = length), longer ones counted at ``max_length``.

    What a training job stores under ``info[SESSION_LENGTHS_INFO_KEY]``.

    >>> length_counts([1, 3, 3, 9], max_length=4)
    [0, 1, 0, 2, 1]
    """
    out = [0] * (max_length + 1)
    for n in lengths:
        if n < 0:
            raise ValueError(f"a session length cannot be negative, got {n}")
        out[min(int(n), max_length)] += 1
    return out


# --------------------------------------------------------------------------- configs


class _Config:
    """Shared by the frozen configs below: strict ``from_dict`` and field checks."""

    @classmethod
    def from_dict(cls, data: Mapping[str, Any] | None) -> Any:
        """Build from a JSON dict; unknown keys raise :class:`ConfigError`."""
        return from_dict(cls, data)

    def _ints(self, *names: str) -> None:
        for name in names:
            v = getattr(self, name)
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise ConfigError(f"{type(self).__name__}.{name} must be an int >= 1, got {v!r}")

    def _within(self, name: str, lo: float, hi: float, lo_open: bool = True) -> None:
        v = getattr(self, name)
        if not (lo < v if lo_open else lo <= v) or not v <= hi:
            raise ConfigError(f"{type(self).__name__}.{name} must be in "
                              f"{'(' if lo_open else '['}{lo}, {hi}], got {v!r}")

    def _window(self, w: int, m: int) -> None:
        if m > w:
            raise ConfigError(f"{type(self).__name__}: min_samples ({m}) cannot exceed "
                              f"window ({w})")


@dataclasses.dataclass(frozen=True)
class PageHinkleyConfig(_Config):
    """Page-Hinkley test on a stream of numbers (e.g. per-click hits).

    Attributes:
        delta: change tolerated (unit of x); larger = fewer false alarms, later detection.
        threshold: lambda; drift when the cumulative deviation exceeds it.
        min_samples: no detection before this many updates.
        alpha: fading factor of the cumulative sum, in (0, 1]; 1 = no fading. Below 1
            the sum's noise no longer averages out (std ~ sigma / sqrt(1 - alpha^2)):
            0.9999 on 0/1 hits gives false alarms at thresholds below ~100.
        direction: ``"down"`` detects a drop of the mean (a metric getting worse),
            ``"up"`` a rise.
    """

    delta: float = 0.02
    threshold: float = 40.0
    min_samples: int = 200
    alpha: float = 1.0
    direction: Literal["up", "down"] = "down"

    def __post_init__(self) -> None:
        self._within("delta", 0.0, math.inf, lo_open=False)
        self._within("threshold", 0.0, math.inf)
        self._ints("min_samples")
        self._within("alpha", 0.0, 1.0)
        if self.direction not in ("up", "down"):
            raise ConfigError(f"direction must be 'up' or 'down', got {self.direction!r}")


@dataclasses.dataclass(frozen=True)
class Adwin0Config(_Config):
    """ADWIN0 cut test (any value range: the bound uses the window's variance).

    Attributes:
        delta: confidence; smaller = fewer false alarms, slower detection.
        max_window: most recent values kept (bounds the cost of a check).
        min_split: smallest sub-window on either side of a cut.
        check_every: test for a cut every this many updates.
    """

    delta: float = 0.002
    max_window: int = 2000
    min_split: int = 16
    check_every: int = 16

    def __post_init__(self) -> None:
        self._within("delta", 0.0, 1.0)
        self._ints("max_window", "min_split", "check_every")
        if self.max_window < 2 * self.min_split:
            raise ConfigError(f"max_window ({self.max_window}) must be >= 2 * min_split")


@dataclasses.dataclass(frozen=True)
class DistributionConfig(_Config):
    """Live item ids against the training distribution.

    Attributes:
        window: most recent live items compared.
        min_samples: no drift before this many live items.
        psi_threshold: drift when PSI over the popularity bins exceeds it
            (rule of thumb: < 0.1 stable, 0.1-0.25 moderate, > 0.25 shifted).
        js_threshold: drift when the JS divergence (bits, in [0, 1]) exceeds it.
        oov_threshold: drift when the share of live items outside the training
            vocabulary exceeds it.
        eps: PSI smoothing (see :func:`psi`).
    """

    window: int = 5000
    min_samples: int = 500
    psi_threshold: float = 0.25
    js_threshold: float = 0.05
    oov_threshold: float = 0.2
    eps: float = 1e-4

    def __post_init__(self) -> None:
        self._ints("window", "min_samples")
        self._window(self.window, self.min_samples)
        self._within("psi_threshold", 0.0, math.inf)
        self._within("js_threshold", 0.0, 1.0)
        self._within("oov_threshold", 0.0, 1.0)
        self._within("eps", 0.0, 0.5)


@dataclasses.dataclass(frozen=True)
class LengthShiftConfig(_Config):
    """Live session lengths against the training window's.

    Attributes:
        window: most recent finished live sessions compared.
        min_samples: no drift before this many.
        ks_threshold: drift when the KS statistic ``D`` (in [0, 1]) exceeds it;
            with 200 sessions sampling noise alone reaches ~0.1 at 5%.
        max_length: longer sessions are counted at this length.
    """

    window: int = 1000
    min_samples: int = 200
    ks_threshold: float = 0.15
    max_length: int = 200

    def __post_init__(self) -> None:
        self._ints("window", "min_samples", "max_length")
        self._window(self.window, self.min_samples)
        self._within("ks_threshold", 0.0, 1.0)


# --------------------------------------------------------------------------- detectors


class DriftDetector(Protocol):
    """What every detector offers (river's interface)."""

    def update(self, x: Any) -> None: ...

    @property
    def drift_detected(self) -> bool: ...

    def reset(self) -> None: ...


class PageHinkley:
    """Page-Hinkley change detector on the mean of a stream; see :class:`PageHinkleyConfig`.

    For ``direction="down"``: ``m_t = alpha * m_{t-1} + (x_t - mean_t + delta)``,
    ``M_t = max(M_{t-1}, m_t)`` and the statistic is ``M_t - m_t``; drift when it
    exceeds ``threshold`` after ``min_samples`` updates (``"up"`` mirrors it).
    The detector starts afresh on the update after a detection.
    """

    def __init__(self, config: PageHinkleyConfig | None = None) -> None:
        self.config = config or PageHinkleyConfig()
        self.reset()

    def reset(self) -> None:
        self.n = 0
        self.mean = 0.0
        self._cum = 0.0
        self._extreme = 0.0
        self.statistic = 0.0
        self._detected = False

    @property
    def drift_detected(self) -> bool:
        return self._detected

    def update(self, x: float) -> None:
        if self._detected:
            self.reset()
        c = self.config
        self.n += 1
        self.mean += (x - self.mean) / self.n
        if c.direction == "down":
            self._cum = c.alpha * self._cum + (x - self.mean + c.delta)
            self._extreme = max(self._extreme, self._cum)
            self.statistic = self._extreme - self._cum
        else:
            self._cum = c.alpha * self._cum + (x - self.mean - c.delta)
            self._extreme = min(self._extreme, self._cum)
            self.statistic = self._cum - self._extreme
        self._detected = self.n >= c.min_samples and self.statistic > c.threshold


class Adwin0:
    """ADWIN-style adaptive window: ADWIN0 (Bifet & Gavalda, 2007) on a bounded window.

    Keeps the last ``max_window`` values. Every ``check_every`` updates it
    tests every split of the window into an older part ``W0`` and a newer
    ``W1`` (both at least ``min_split`` long): a cut is significant when
    ``|mean(W0) - mean(W1)| > sqrt(2 var ln(2/d) / m) + 2 ln(2/d) / (3 m)``
    with ``m = 1 / (1/|W0| + 1/|W1|)``, ``d = delta / |W|`` and ``var`` the
    window's variance. On a cut it drops the older part and tests again until
    no cut remains; ``drift_detected`` is then True until the next update.
    This is the simple O(|W|)-per-check form, not the bucketed, memory-bounded
    ADWIN; ``max_window`` bounds its cost.

    >>> det = Adwin0(Adwin0Config(max_window=200, min_split=10, check_every=10))
    >>> fired = []
    >>> for i in range(200):
    ...     det.update(0.0 if i < 100 else 1.0)
    ...     fired += [(i, det.width)] if det.drift_detected else []
    >>> fired  # at the 2nd check after the step; 5 old values survive the cut
    [(119, 25)]
    """

    def __init__(self, config: Adwin0Config | None = None) -> None:
        self.config = config or Adwin0Config()
        self.reset()

    def reset(self) -> None:
        self._window: deque[float] = deque(maxlen=self.config.max_window)
        self._since_check = 0
        self._detected = False

    @property
    def drift_detected(self) -> bool:
        return self._detected

    @property
    def width(self) -> int:
        return len(self._window)

    @property
    def mean(self) -> float | None:
        return float(np.mean(self._window)) if self._window else None

    def update(self, x: float) -> None:
        self._detected = False
        self._window.append(float(x))
        self._since_check += 1
        if self._since_check < self.config.check_every:
            return
        self._since_check = 0
        while (cut := self._first_cut()) is not None:
            for _ in range(cut):
                self._window.popleft()
            self._detected = True

    def _first_cut(self) -> int | None:
        """Size of the smallest older part ``W0`` with a significant cut, else None."""
        c, n = self.config, len(self._window)
        if n < 2 * c.min_split:
            return None
        w = np.fromiter(self._window, dtype=np.float64, count=n)  # [n]
        sums = np.cumsum(w)  # [n]
        n0 = np.arange(c.min_split, n - c.min_split + 1)  # [S] sizes of W0
        n1 = n - n0
        diff = np.abs(sums[n0 - 1] / n0 - (sums[-1] - sums[n0 - 1]) / n1)  # [S]
        m = 1.0 / (1.0 / n0 + 1.0 / n1)
        log_term = math.log(2.0 * n / c.delta)
        eps = np.sqrt(2.0 * float(w.var()) * log_term / m) + 2.0 * log_term / (3.0 * m)
        hits = np.flatnonzero(diff > eps)
        return int(n0[hits[0]]) if hits.size else None


class Prequential:
    """Prequential (test-then-train) HR@k and NDCG@k over the last ``window`` clicks.

    ``update(rank)`` takes the 1-based rank at which the clicked item was shown
    (``None``: not shown). Not a detector: feed :attr:`last_hit` to one.

    >>> m = Prequential(k=3, window=4)
    >>> for r in [1, None, 3, 5]:
    ...     m.update(r)
    >>> m.n, m.hr, round(m.ndcg, 4)  # hits at ranks 1 and 3: (1 + 0.5) / 4
    (4, 0.5, 0.375)
    """

    def __init__(self, k: int, window: int) -> None:
        if k < 1 or window < 1:
            raise ValueError(f"k and window must be >= 1, got k={k}, window={window}")
        self.k = k
        self._hits: deque[float] = deque(maxlen=window)
        self._gains: deque[float] = deque(maxlen=window)
        self.last_hit = 0.0

    @property
    def n(self) -> int:
        return len(self._hits)

    @property
    def hr(self) -> float | None:
        return math.fsum(self._hits) / len(self._hits) if self._hits else None

    @property
    def ndcg(self) -> float | None:
        return math.fsum(self._gains) / len(self._gains) if self._gains else None

    def update(self, rank: int | None) -> None:
        hit, gain = rank_gain(rank, self.k)
        self._hits.append(hit)
        self._gains.append(gain)
        self.last_hit = hit


class ItemReference:
    """The training window's item distribution, grouped into popularity bins.

    Items are sorted by training count (most frequent first) and cut into
    ``n_bins`` contiguous groups of about equal training mass (an item heavier
    than one bin's share gets a bin of its own, so there may be fewer bins).
    Comparing bins rather than single items keeps PSI and JS meaningful for
    catalogues far larger than a live window: per-item divergences of a few
    thousand clicks over 100k items are mostly sampling noise.

    >>> ref = ItemReference.from_counts(["a", "b", "c", "d"], [6, 2, 1, 1], n_bins=2)
    >>> ref.bin_of, ref.expected.tolist()
    ({'a': 0, 'b': 1, 'c': 1, 'd': 1}, [6.0, 4.0])
    """

    def __init__(self, bin_of: Mapping[str, int], expected: np.ndarray) -> None:
        self.bin_of = dict(bin_of)
        self.expected = np.asarray(expected, dtype=np.float64)

    @property
    def n_bins(self) -> int:
        return int(self.expected.size)

    @classmethod
    def from_counts(cls, items: Sequence[Any], counts: Sequence[float] | np.ndarray,
                    n_bins: int = 20) -> ItemReference:
        """Items (any ids; compared as ``str``) and their training counts."""
        c = np.asarray(counts, dtype=np.float64)
        if len(items) != c.size or c.size == 0:
            raise ValueError(f"need one count per item and at least one item; got "
                             f"{len(items)} items and {c.size} counts")
        if n_bins < 1:
            raise ValueError(f"n_bins must be >= 1, got {n_bins}")
        if (c < 0).any() or c.sum() <= 0:
            raise ValueError("training counts must be >= 0 with a positive total")
        order = np.argsort(-c, kind="stable")  # [N] most frequent first
        before = np.cumsum(c[order]) - c[order]  # [N] mass before each item
        raw = np.minimum((n_bins * before / c.sum()).astype(np.int64), n_bins - 1)  # [N]
        _, dense = np.unique(raw, return_inverse=True)  # [N] bins renumbered 0..B-1
        expected = np.bincount(dense, weights=c[order])  # [B]
        bin_of = {str(items[i]): int(b) for i, b in zip(order.tolist(), dense.tolist(),
                                                        strict=True)}
        return cls(bin_of, expected)


class DistributionMonitor:
    """Live item ids against an :class:`ItemReference`: PSI, JS and the OOV rate.

    ``update(item)`` adds one live item to a sliding window of the last
    ``window``. PSI and JS compare the window's in-vocabulary items, binned as
    the reference, with the reference; the OOV rate is the share of window
    items not in the training vocabulary (measured on its own, not folded into
    PSI/JS). ``drift_detected`` when any statistic exceeds its threshold with
    at least ``min_samples`` items behind it (in-vocabulary items for PSI and
    JS, all items for the OOV rate); :attr:`triggered` names which.

    >>> ref = ItemReference.from_counts(["a", "b"], [1, 1], n_bins=2)
    >>> mon = DistributionMonitor(ref, DistributionConfig(window=4, min_samples=3))
    >>> for item in ["a", "a", "a", "zz"]:
    ...     mon.update(item)
    >>> mon.oov_rate, round(mon.psi, 3), mon.triggered  # 0.5 ln 2 + 0.4999 ln(0.5 / 1e-4)
    (0.25, 4.604, ('item_psi', 'item_js', 'oov_rate'))
    """

    def __init__(self, reference: ItemReference, config: DistributionConfig | None = None) -> None:
        self.reference = reference
        self.config = config or DistributionConfig()
        self.reset()

    def reset(self) -> None:
        self._window: deque[int] = deque()  # bin per live item, -1 = OOV
        self._counts = np.zeros(self.reference.n_bins, dtype=np.int64)
        self._oov = 0

    @property
    def n(self) -> int:
        return len(self._window)

    def update(self, item: Any) -> None:
        b = self.reference.bin_of.get(str(item), -1)
        self._window.append(b)
        self._add(b, 1)
        if len(self._window) > self.config.window:
            self._add(self._window.popleft(), -1)

    def _add(self, b: int, sign: int) -> None:
        if b < 0:
            self._oov += sign
        else:
            self._counts[b] += sign

    @property
    def oov_rate(self) -> float | None:
        return self._oov / len(self._window) if self._window else None

    @property
    def psi(self) -> float | None:
        if not self._counts.any():
            return None
        return psi(self.reference.expected, self._counts, self.config.eps)

    @property
    def js(self) -> float | None:
        return js_divergence(self.reference.expected, self._counts) if self._counts.any() else None

    def statistics(self) -> dict[str, float | None]:
        """``{detector name: statistic}`` (None while undefined: no item, or none in vocabulary)."""
        return {ITEM_PSI: self.psi, ITEM_JS: self.js, OOV_RATE: self.oov_rate}

    def thresholds(self) -> dict[str, float]:
        c = self.config
        return {ITEM_PSI: c.psi_threshold, ITEM_JS: c.js_threshold, OOV_RATE: c.oov_threshold}

    @property
    def triggered(self) -> tuple[str, ...]:
        limits, least = self.thresholds(), self.config.min_samples
        enough = {ITEM_PSI: self._counts.sum() >= least, ITEM_JS: self._counts.sum() >= least,
                  OOV_RATE: len(self._window) >= least}
        return tuple(name for name, v in self.statistics().items()
                     if enough[name] and v is not None and v > limits[name])

    @property
    def drift_detected(self) -> bool:
        return bool(self.triggered)


class LengthShift:
    """Finished-session lengths against the training window's: the KS statistic.

    ``reference`` counts training sessions by length (index = length, as
    :func:`length_counts` builds it). ``update(length)`` adds one finished live
    session to a window of the last ``window``; :attr:`ks` is the two-sample
    KS statistic between the two histograms and :attr:`mean_shift` the live
    mean length minus the reference mean.

    >>> shift = LengthShift([0, 0, 5, 5], LengthShiftConfig(window=4, min_samples=4,
    ...                                                     max_length=3))
    >>> for n in [3, 3, 7, 3]:
    ...     shift.update(n)
    >>> shift.ks, shift.mean_shift, shift.drift_detected  # 7 is counted as 3 (max_length)
    (0.5, 0.5, True)
    """

    def __init__(self, reference: Sequence[int] | np.ndarray,
                 config: LengthShiftConfig | None = None) -> None:
        self.config = config or LengthShiftConfig()
        size = self.config.max_length + 1
        ref = np.asarray(reference, dtype=np.float64)
        if ref.ndim != 1 or ref.size == 0 or (ref < 0).any() or ref.sum() <= 0:
            raise ValueError("the reference must count at least one session by length "
                             "(index = length), e.g. model.drift.length_counts(lengths)")
        clipped = np.zeros(size)
        clipped[: min(ref.size, size)] = ref[:size]
        clipped[-1] += ref[size:].sum()
        self.reference = clipped
        self._ref_mean = float(np.dot(np.arange(size), clipped) / clipped.sum())
        self.reset()

    def reset(self) -> None:
        self._window: deque[int] = deque()
        self._counts = np.zeros(self.config.max_length + 1, dtype=np.int64)

    @property
    def n(self) -> int:
        return len(self._window)

    def update(self, length: int) -> None:
        if length < 0:
            raise ValueError(f"a session length cannot be negative, got {length}")
        n = min(int(length), self.config.max_length)
        self._window.append(n)
        self._counts[n] += 1
        if len(self._window) > self.config.window:
            self._counts[self._window.popleft()] -= 1

    @property
    def ks(self) -> float | None:
        return ks_statistic(self.reference, self._counts) if self._window else None

    @property
    def mean_shift(self) -> float | None:
        if not self._window:
            return None
        return float(np.mean(self._window)) - self._ref_mean

    @property
    def drift_detected(self) -> bool:
        d = self.ks
        return self.n >= self.config.min_samples and d is not None and d > self.config.ks_threshold
