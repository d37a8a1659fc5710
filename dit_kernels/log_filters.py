"""Third-party log records that do not apply to a call of ours, dropped at that call and nowhere else."""

from __future__ import annotations

import contextlib
import logging
from typing import Iterator


@contextlib.contextmanager
def without_records(logger_name: str, text: str) -> Iterator[None]:
    """Inside the block, drop the records logged to ``logger_name`` (exactly that logger) whose message
    contains ``text``; every other record, of that logger or any other, passes."""
    logger = logging.getLogger(logger_name)

    def keep(record: logging.LogRecord) -> bool:
        return text not in record.getMessage()

    logger.addFilter(keep)
    try:
        yield
    finally:
        logger.removeFilter(keep)
