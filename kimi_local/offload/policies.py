"""Expert-cache policies: which experts of one MoE layer stay in a fast tier (GPU slots, or RAM for the disk tier).

Every policy has the same interface, keyed by expert id within a layer:

    cache.begin_step(load_budget)   # a new forward of this layer; at most load_budget loads during it
    cache.prefetch(experts)         # load predicted experts ahead of use (within the budget)
    cache.access(expert) -> hit     # a routed expert is used; on a miss the policy may admit it
    cache.resident()                # the experts held now

A miss never waits: the runtime computes that expert on the slower tier (the CPU) and the policy decides whether to
load it for next time.  Loads are bounded per step because the link is (PCIe refills ~6-12% of a token's expert
uses at 20 tok/s, anchors §6.3), so a policy lives off reuse.  Experts used or prefetched in the current step are
never evicted by a later load in the same step.

Policies: ``lru`` (least recently used), ``lfu`` (frequency with exponential decay), ``predictive`` (recency and
frequency blended by decay, plus the predictor's next experts, which are loaded ahead and protected).
"""

from __future__ import annotations

import math
from abc import ABC, abstractmethod
from collections import OrderedDict
from dataclasses import asdict, dataclass
from typing import Iterable, Optional


@dataclass
class CacheStats:
    """Counters of one cache (one layer), summable across layers."""

    accesses: int = 0
    hits: int = 0
    demand_loads: int = 0      # misses admitted after use
    prefetch_loads: int = 0    # loaded ahead of use
    prefetch_used: int = 0     # prefetched experts that were used before eviction
    evictions: int = 0
    denied_loads: int = 0      # loads skipped because the step's budget was spent

    @property
    def misses(self) -> int:
        return self.accesses - self.hits

    @property
    def loads(self) -> int:
        return self.demand_loads + self.prefetch_loads

    @property
    def hit_rate(self) -> float:
        return self.hits / self.accesses if self.accesses else 0.0

    def __add__(self, other: "CacheStats") -> "CacheStats":
        return CacheStats(**{k: getattr(self, k) + getattr(other, k) for k in asdict(self)})

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(misses=self.misses, loads=self.loads, hit_rate=self.hit_rate)
        return d


class ExpertCache(ABC):
    """A fixed number of slots holding expert ids of one layer; subclasses choose victims (and admissions)."""

    name = "base"

    def __init__(self, capacity: int):
        if capacity < 0:
            raise ValueError(f"capacity must be >= 0, got {capacity}")
        self.capacity = capacity
        self.stats = CacheStats()
        self.clock = 0                        # steps begun; the unit of recency and decay
        self._slots: dict[int, None] = {}     # resident experts (insertion-ordered)
        self._budget: Optional[float] = None  # load credit this step; None: unlimited
        self._in_use: set[int] = set()        # used or prefetched this step: not evictable
        self._prefetched: set[int] = set()    # loaded by prefetch and not yet used

    # -- interface -------------------------------------------------------------------------------------------

    def begin_step(self, load_budget: Optional[float] = None) -> None:
        """Start a forward of this layer; ``load_budget`` caps loads during it (None: unlimited).

        A fractional budget is a rate: 0.5 allows one load every other step.  Unused credit carries over up to
        one step's worth (at least one load), like a token bucket.
        """
        self.clock += 1
        if load_budget is None:
            self._budget = None
        else:
            carried = self._budget if self._budget is not None else 0.0
            self._budget = min(carried + load_budget, max(1.0, float(load_budget)))
        self._in_use.clear()

    def access(self, expert: int) -> bool:
        """Record a use of ``expert``; True if it was resident.  A miss may admit it (budget permitting)."""
        self.stats.accesses += 1
        self._in_use.add(expert)
        self._touch(expert)
        if expert in self._slots:
            self.stats.hits += 1
            if expert in self._prefetched:
                self._prefetched.discard(expert)
                self.stats.prefetch_used += 1
            return True
        if self._has_room() and self._admit(expert):
            if self._spend():
                self._insert(expert)
                self.stats.demand_loads += 1
            else:
                self.stats.denied_loads += 1
        return False

    def prefetch(self, experts: Iterable[int]) -> list[int]:
        """Load the given experts ahead of use, in order, while budget and slots last; returns those loaded."""
        loaded = []
        for e in experts:
            self._note_prediction(e)
            if e in self._slots:
                self._in_use.add(e)  # predicted for this step: keep it
                continue
            if not self._has_room():
                break  # every slot holds something needed this step
            if not self._spend():
                self.stats.denied_loads += 1
                break
            self._in_use.add(e)
            self._insert(e)
            self._prefetched.add(e)
            self.stats.prefetch_loads += 1
            loaded.append(e)
        return loaded

    def resident(self) -> frozenset[int]:
        """The experts held now."""
        return frozenset(self._slots)

    def __contains__(self, expert: int) -> bool:
        return expert in self._slots

    def __len__(self) -> int:
        return len(self._slots)

    # -- policy hooks ----------------------------------------------------------------------------------------

    def _touch(self, expert: int) -> None:
        """Update recency/frequency bookkeeping for a use (hit or miss)."""

    def _admit(self, expert: int) -> bool:
        """Whether a missed expert should be loaded; default always."""
        return True

    def _note_prediction(self, expert: int) -> None:
        """A predictor named this expert for the coming step."""

    @abstractmethod
    def _victim(self, candidates: list[int]) -> int:
        """Pick the expert to evict among ``candidates`` (resident, not in use this step)."""

    def _on_evict(self, expert: int) -> None:
        """Bookkeeping after an eviction."""

    # -- mechanics -------------------------------------------------------------------------------------------

    def _spend(self) -> bool:
        """Take one load from this step's budget; False when it is spent."""
        if self._budget is None:
            return True
        if self._budget < 1.0:
            return False
        self._budget -= 1.0
        return True

    def _has_room(self) -> bool:
        """A free slot, or a resident not in use this step that may be evicted."""
        if len(self._slots) < self.capacity:
            return True
        return any(e not in self._in_use for e in self._slots)

    def _insert(self, expert: int) -> None:
        """Add ``expert``, evicting a resident not in use this step when full (callers check ``_has_room``)."""
        if len(self._slots) >= self.capacity:
            victim = self._victim([e for e in self._slots if e not in self._in_use])
            del self._slots[victim]
            self._prefetched.discard(victim)
            self.stats.evictions += 1
            self._on_evict(victim)
        self._slots[expert] = None


class LRUCache(ExpertCache):
    """Least recently used: evict the expert whose last use is oldest."""

    name = "lru"

    def __init__(self, capacity: int):
        super().__init__(capacity)
        self._order: OrderedDict[int, None] = OrderedDict()  # resident, least recent first

    def _touch(self, expert: int) -> None:
        if expert in self._order:
            self._order.move_to_end(expert)

    def _insert(self, expert: int) -> None:
        super()._insert(expert)
        self._order[expert] = None
        self._order.move_to_end(expert)

    def _victim(self, candidates: list[int]) -> int:
        allowed = set(candidates)
        return next(e for e in self._order if e in allowed)

    def _on_evict(self, expert: int) -> None:
        del self._order[expert]


class _DecayedScores:
    """Exponentially decayed use counts for every expert, updated in O(1) by a growing weight.

    A use at step t adds g**t with g = 2**(1/half_life); comparing stored values compares decayed counts, since
    all of them share the factor g**-now.  Values are rescaled before they overflow.
    """

    def __init__(self, half_life: float):
        self.half_life = half_life
        self.growth = 2.0 ** (1.0 / half_life) if math.isfinite(half_life) and half_life > 0 else 1.0
        self.offset = 0  # step at which weights were last rescaled to 1
        self.score: dict[int, float] = {}
        self.last: dict[int, int] = {}

    def add(self, expert: int, step: int, amount: float = 1.0) -> None:
        w = self.growth ** (step - self.offset)
        if w > 1e200:
            self._rescale(step)
            w = 1.0
        self.score[expert] = self.score.get(expert, 0.0) + amount * w
        self.last[expert] = step

    def _rescale(self, step: int) -> None:
        f = self.growth ** (step - self.offset)
        self.score = {e: s / f for e, s in self.score.items()}
        self.offset = step

    def value(self, expert: int, step: int) -> float:
        """The decayed count as of ``step``."""
        return self.score.get(expert, 0.0) / self.growth ** (step - self.offset)


class LFUDecayCache(ExpertCache):
    """Least frequently used with exponential decay (half-life in steps): evict the lowest decayed count.

    Counts are kept for every expert seen, not only residents, so a returning expert keeps its history.
    Ties go to the least recently used.  ``half_life=inf`` is plain LFU.
    """

    name = "lfu"

    def __init__(self, capacity: int, half_life: float = 64.0):
        super().__init__(capacity)
        self.scores = _DecayedScores(half_life)

    def _touch(self, expert: int) -> None:
        self.scores.add(expert, self.clock)

    def _victim(self, candidates: list[int]) -> int:
        s, last = self.scores.score, self.scores.last
        return min(candidates, key=lambda e: (s.get(e, 0.0), last.get(e, -1)))


class PredictiveCache(ExpertCache):
    """Prediction-aware cache: prefetches the predictor's next experts and protects them from eviction;
    otherwise evicts by a short-half-life decayed count, which blends recency and frequency (LRFU).

    ``prefetch`` is the hook the predictor drives; without predictions this behaves as LRFU.
    """

    name = "predictive"

    def __init__(self, capacity: int, half_life: float = 8.0, prediction_weight: float = 1.0):
        super().__init__(capacity)
        self.scores = _DecayedScores(half_life)
        self.prediction_weight = prediction_weight

    def _touch(self, expert: int) -> None:
        self.scores.add(expert, self.clock)

    def _note_prediction(self, expert: int) -> None:
        # A prediction counts as a fractional use: predicted experts outlive unpredicted ones of equal history.
        self.scores.add(expert, self.clock, self.prediction_weight * 0.5)

    def _victim(self, candidates: list[int]) -> int:
        s, last = self.scores.score, self.scores.last
        return min(candidates, key=lambda e: (s.get(e, 0.0), last.get(e, -1)))


POLICIES: dict[str, type[ExpertCache]] = {"lru": LRUCache, "lfu": LFUDecayCache, "predictive": PredictiveCache}


def make_cache(policy: str, capacity: int, **kwargs) -> ExpertCache:
    """A cache of ``capacity`` slots with the named policy (lru, lfu, predictive)."""
    try:
        cls = POLICIES[policy]
    except KeyError:
        raise ValueError(f"unknown cache policy {policy!r} (known: {', '.join(POLICIES)})") from None
    return cls(capacity, **kwargs)


class LayeredCache:
    """One cache per MoE layer, same policy and capacity, with per-layer and total statistics."""

    def __init__(self, policy: str, capacity: int, layers: Iterable[int], **kwargs):
        self.policy = policy
        self.capacity = capacity
        self.layers: dict[int, ExpertCache] = {l: make_cache(policy, capacity, **kwargs) for l in layers}

    def __getitem__(self, layer: int) -> ExpertCache:
        return self.layers[layer]

    def stats_by_layer(self) -> dict[int, CacheStats]:
        """Each layer's counters."""
        return {l: c.stats for l, c in self.layers.items()}

    def total_stats(self) -> CacheStats:
        """All layers' counters summed."""
        total = CacheStats()
        for c in self.layers.values():
            total = total + c.stats
        return total

    def reset_stats(self) -> None:
        """Zero the counters (e.g. after a warm-up), keeping what is resident."""
        for c in self.layers.values():
            c.stats = CacheStats()
