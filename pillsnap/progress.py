"""Progress for long steps: a terminal bar, plus optional listeners (the orchestrator turns them into artifacts)."""
from __future__ import annotations

import sys
from contextlib import contextmanager
from typing import Callable, Iterator, List, Optional

from tqdm import tqdm

ProgressListener = Callable[[str, int, Optional[int]], None]  # (description, done, total)
_listeners: List[ProgressListener] = []


def add_listener(listener: ProgressListener) -> None:
    _listeners.append(listener)


def remove_listener(listener: ProgressListener) -> None:
    if listener in _listeners:
        _listeners.remove(listener)


class _Bar:
    def __init__(self, bar: tqdm, desc: str, total: Optional[int]):
        self._bar, self._desc, self._total, self.done = bar, desc, total, 0

    def update(self, n: int = 1) -> None:
        self.done += n
        self._bar.update(n)
        for listener in list(_listeners):
            listener(self._desc, self.done, self._total)

    def set_postfix_str(self, text: str) -> None:
        self._bar.set_postfix_str(text, refresh=False)


@contextmanager
def progress(total: Optional[int], desc: str, unit: str = "it", enabled: bool = True) -> Iterator[_Bar]:
    bar = tqdm(total=total, desc=desc, unit=unit, disable=not enabled, file=sys.stderr,
               mininterval=1.0, dynamic_ncols=True)
    try:
        yield _Bar(bar, desc, total)
    finally:
        bar.close()


def relay(desc: str, done: int, total: Optional[int]) -> None:
    """Progress measured in another process (rank 0 of a distributed run): to this process's listeners."""
    for listener in list(_listeners):
        listener(desc, done, total)
