"""Progress reporting and interruption for long loops.

Every long loop in nvs_core takes a ``progress`` factory: ``progress(total, desc)`` returns a
:class:`Progress`. The host glue in ``nodes/`` supplies one backed by ComfyUI's ProgressBar whose
interrupt check raises ComfyUI's own exception; headless callers get tqdm.
"""
from __future__ import annotations

from typing import Callable, Optional


class Interrupted(RuntimeError):
    """Raised by :meth:`Progress.check` when the caller asked to stop."""


class Progress:
    """Counts steps, forwards them to ``on_update(done, total)`` and checks for interruption.

    ``should_stop`` returns True to stop (this raises :class:`Interrupted`) or raises its own
    exception (ComfyUI's interrupt does that), which then propagates unchanged.
    """

    def __init__(self, total: int, desc: str = "",
                 on_update: Optional[Callable[[int, int], None]] = None,
                 should_stop: Optional[Callable[[], bool]] = None):
        self.total = int(total)
        self.desc = desc
        self.done = 0
        self._on_update = on_update
        self._should_stop = should_stop

    def check(self) -> None:
        if self._should_stop is not None and self._should_stop():
            raise Interrupted(f"{self.desc or 'operation'} interrupted at step {self.done}/{self.total}")

    def update(self, n: int = 1) -> None:
        self.done = min(self.done + n, self.total) if self.total > 0 else self.done + n
        if self._on_update is not None:
            self._on_update(self.done, self.total)
        self.check()

    def close(self) -> None:
        """Release resources held by the reporter (tqdm bar); safe to call twice."""

    def __enter__(self) -> "Progress":
        self.check()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class TqdmProgress(Progress):
    """Console progress for headless use (CLI, tests, training scripts)."""

    def __init__(self, total: int, desc: str = "", should_stop: Optional[Callable[[], bool]] = None,
                 disable: bool = False):
        from tqdm.auto import tqdm

        self._bar = tqdm(total=total, desc=desc, disable=disable, leave=False)
        super().__init__(total, desc, on_update=self._advance, should_stop=should_stop)

    def _advance(self, done: int, total: int) -> None:
        self._bar.n = done
        self._bar.refresh()

    def close(self) -> None:
        if self._bar is not None:
            self._bar.close()
            self._bar = None


ProgressFactory = Callable[[int, str], Progress]


class SharedProgress(Progress):
    """Lets inner loops advance one outer reporter without closing it (one bar for several stages)."""

    def __init__(self, outer: Progress):
        super().__init__(outer.total, outer.desc)
        self._outer = outer

    def check(self) -> None:
        self._outer.check()

    def update(self, n: int = 1) -> None:
        self._outer.update(n)


def shared(outer: Progress) -> ProgressFactory:
    """A factory whose reporters all advance ``outer``."""
    return lambda total, desc="": SharedProgress(outer)


def tqdm_progress(total: int, desc: str = "") -> Progress:
    return TqdmProgress(total, desc)


def silent_progress(total: int, desc: str = "") -> Progress:
    return Progress(total, desc)


def resolve(progress: Optional[ProgressFactory], total: int, desc: str) -> Progress:
    """The reporter a loop should use: the caller's factory, else a console bar."""
    return (progress or tqdm_progress)(total, desc)
