"""TensorBoard writer that degrades to a no-op (with one warning) when tensorboard is missing or disabled."""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Optional

log = logging.getLogger(__name__)


class TBWriter:
    def __init__(self, logdir: Path, enabled: bool = True):
        self._writer = None
        self.logdir = Path(logdir)
        if not enabled:
            return
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError as e:
            log.warning("TensorBoard unavailable (%s); metrics go to the log and metrics.json only", e)
            return
        self._writer = SummaryWriter(log_dir=str(self.logdir))

    def scalar(self, tag: str, value: Optional[float], step: int) -> None:
        if self._writer is not None and value is not None:
            self._writer.add_scalar(tag, float(value), step)

    def flush(self) -> None:
        if self._writer is not None:
            self._writer.flush()

    def close(self) -> None:
        if self._writer is not None:
            self._writer.close()
            self._writer = None
