"""Following a training job's dump folder: each new dump measured once it is complete, a
record per step (its global norm, over --max-norm or not, the layers anomalous in it as
history --by-layer judges them, the running percentiles), and a summary at the end.

The folder is polled (no new dependency; idle, gclip lists it once per interval).  A dump is
read once its identity (inode, size, modification time) has stayed the same over one whole
interval, so a file still being written is left alone; temporary names (``.name``,
``*.tmp``, ``*.part``, ``*~`` ...) are ignored until renamed.  A dump that cannot be read
(half-written, deleted or truncated while read) is reported and skipped, and read again if it
changes later.
"""

from __future__ import annotations

import math
import os
import re
import stat
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from .engine import combine
from .errors import InputError, UsageError
from .history import PERCENTILES
from .layer_history import SPIKE, Anomaly, Baseline, layers_of
from .options import Options
from .views import natural_key

if TYPE_CHECKING:
    from .pipeline import Measured

# Names writers give files before renaming them into place.
_TEMPORARY = re.compile(
    r"^[.~]|~$|\.(tmp|temp|part|partial|incomplete|download|lock|swp)(\b|_|$)", re.IGNORECASE
)

Identity = tuple[int, int, int, int]  # device, inode, size, modification time (ns)


def is_temporary(name: str) -> bool:
    """Whether *name* is one writers use until the file is complete (then renamed)."""
    return bool(_TEMPORARY.search(name))


@dataclass(frozen=True)
class StepRecord:
    """One dump read: its step (from the file, else None), global norm, NaN/Inf count,
    whether it exceeds max_norm, its layers' anomalies, and the percentiles of the global
    norms so far."""

    file: str
    step: int | None
    global_norm: float
    nonfinite: int
    over_max_norm: bool | None
    anomalies: tuple[Anomaly, ...]
    percentiles: dict[str, float]

    def to_dict(self) -> dict:
        return {
            "kind": "step",
            "step": self.step,
            "file": self.file,
            "global_norm": _finite_or_none(self.global_norm),
            "nonfinite": self.nonfinite,
            "over_max_norm": self.over_max_norm,
            "anomalies": [_anomaly_dict(a) for a in self.anomalies],
            "percentiles": self.percentiles,
        }


@dataclass(frozen=True)
class Skipped:
    """A dump that could not be read, and why."""

    file: str
    reason: str

    def to_dict(self) -> dict:
        return {"kind": "skipped", "file": self.file, "reason": self.reason}


Record = StepRecord | Skipped


@dataclass(frozen=True)
class WatchSummary:
    """What watching saw, when it stops."""

    steps: int
    skipped: int
    percentiles: dict[str, float]
    max_norm: float | None
    over_max_norm: int
    first_over: StepRecord | None
    first_anomaly: Anomaly | None
    stopped: str  # "interrupted", "terminated" or "exceeded"

    def to_dict(self) -> dict:
        first_over = self.first_over
        return {
            "kind": "summary",
            "steps": self.steps,
            "skipped": self.skipped,
            "percentiles": self.percentiles,
            "max_norm": self.max_norm,
            "over_max_norm": self.over_max_norm,
            "first_over": None
            if first_over is None
            else {
                "step": first_over.step,
                "file": first_over.file,
                "global_norm": _finite_or_none(first_over.global_norm),
            },
            "first_anomaly": None if self.first_anomaly is None else self.first_anomaly.to_dict(),
            "stopped": self.stopped,
        }


def _anomaly_dict(anomaly: Anomaly) -> dict:
    found = anomaly.to_dict()
    del found["step"]  # the record's own
    return found


def _finite_or_none(value: float) -> float | None:
    return value if math.isfinite(value) else None


class Poller:
    """The dumps of *folder* ready to read: regular files, not of temporary names, whose
    identity has not changed since the previous poll and that were not read as they are."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._seen: dict[str, Identity] = {}  # at the previous poll
        self._done: dict[str, Identity] = {}  # read (or skipped) with this identity

    def ready(self) -> list[Path]:
        now = dict(self._listing())
        ready = [
            name
            for name, identity in now.items()
            if self._seen.get(name) == identity and self._done.get(name) != identity
        ]
        self._seen = now
        self._done = {name: i for name, i in self._done.items() if name in now}
        return [self.folder / name for name in sorted(ready, key=natural_key)]

    def done(self, path: Path, identity: Identity) -> None:
        self._done[path.name] = identity

    def _listing(self) -> Iterator[tuple[str, Identity]]:
        try:
            entries = list(os.scandir(self.folder))
        except OSError as exc:
            raise InputError(self.folder, f"cannot list: {exc.strerror or exc}") from None
        for entry in entries:
            if is_temporary(entry.name):
                continue
            identity = identity_of(Path(entry.path))
            if identity is not None:
                yield entry.name, identity


def identity_of(path: Path) -> Identity | None:
    """A regular file's identity, or None (gone, or not a regular file)."""
    try:
        found = os.stat(path)
    except OSError:
        return None
    if not stat.S_ISREG(found.st_mode):
        return None
    return (found.st_dev, found.st_ino, found.st_size, found.st_mtime_ns)


@dataclass
class Run:
    """What the dumps read so far add up to: the global norms, each layer's baseline."""

    options: Options
    max_norm: float | None = None
    spike: float = SPIKE
    depth: int | None = None
    norms: list[float] = field(default_factory=list)  # the finite global norms, sorted
    baselines: dict[str, Baseline] = field(default_factory=dict)
    steps: int = 0
    skipped: int = 0
    over_max_norm: int = 0
    first_over: StepRecord | None = None
    first_anomaly: Anomaly | None = None

    def read(self, path: Path) -> tuple[Record, Identity | None]:
        """Measure the dump *path*: its record (or why it was skipped) and the identity it
        had when read."""
        from .pipeline import measure_source

        before = identity_of(path)
        try:
            measured = measure_source(path, self.options, with_step=True)
        except InputError as exc:
            self.skipped += 1
            return Skipped(str(path), exc.message), before
        if identity_of(path) != before:
            self.skipped += 1
            gone = identity_of(path) is None
            return Skipped(str(path), f"{'deleted' if gone else 'changed'} while read"), before
        if not any(s is not None for s in measured.stats):
            self.skipped += 1
            return Skipped(str(path), "holds no tensor to count"), before
        return self._record(str(path), measured), before

    def _record(self, file: str, measured: Measured) -> StepRecord:
        found = measured.step
        step = None if found is None else found.value
        stats = [s for s in measured.stats if s is not None]
        total = combine(stats, self.options.norm_type)
        norm = self.options.norm(total)
        if math.isfinite(norm):
            self.norms.insert(int(np.searchsorted(self.norms, norm)), norm)
        over = None if self.max_norm is None else not norm <= self.max_norm
        anomalies = self._anomalies(measured, step)
        record = StepRecord(file, step, norm, total.nonfinite, over, anomalies, self.percentiles)
        self.steps += 1
        if over:
            self.over_max_norm += 1
            self.first_over = self.first_over or record
        if anomalies and self.first_anomaly is None:
            self.first_anomaly = anomalies[0]
        return record

    def _anomalies(self, measured: Measured, step: int | None) -> tuple[Anomaly, ...]:
        """The layers of *measured* anomalous at this step, furthest above its median first."""
        found = []
        for name, stats in layers_of(measured, self.options.norm_type, self.depth).items():
            norm = self.options.norm(stats)
            anomalous, baseline = self.baselines.setdefault(name, Baseline(self.spike)).judge(norm)
            if anomalous:
                found.append(Anomaly(name, self.steps, step, norm, baseline))
        return tuple(sorted(found, key=lambda a: -a.ratio))

    @property
    def percentiles(self) -> dict[str, float]:
        if not self.norms:
            return {}
        return {f"p{p:g}": float(np.percentile(self.norms, p)) for p in PERCENTILES}

    def summary(self, stopped: str) -> WatchSummary:
        return WatchSummary(
            self.steps,
            self.skipped,
            self.percentiles,
            self.max_norm,
            self.over_max_norm,
            self.first_over,
            self.first_anomaly,
            stopped,
        )


def refuse_unwatchable(folder: Path, run: Run, interval: float, exit_on_exceed: bool) -> None:
    """Refuse what watch() cannot do, before anything is printed."""
    if not interval > 0:
        raise UsageError(None, f"--interval must be > 0, not {interval}")
    if exit_on_exceed and run.max_norm is None:
        raise UsageError(None, "--exit-on-exceed needs --max-norm")
    if not folder.is_dir():
        raise InputError(folder, "is not a folder")


def watch(
    folder: Path,
    run: Run,
    emit: Callable[[Record], None],
    *,
    interval: float = 1.0,
    exit_on_exceed: bool = False,
) -> WatchSummary:
    """Read each dump that appears in *folder* (and those already there) once complete,
    telling *emit* of each; until interrupted (Ctrl-C: the caller's to catch; run.summary
    has what was seen), or with *exit_on_exceed* until a dump exceeds run.max_norm."""
    refuse_unwatchable(folder, run, interval, exit_on_exceed)
    poller = Poller(folder)
    while True:
        for path in poller.ready():
            record, identity = run.read(path)
            if identity is not None:
                poller.done(path, identity)
            emit(record)
            if exit_on_exceed and isinstance(record, StepRecord) and record.over_max_norm:
                return run.summary("exceeded")
        time.sleep(interval)
