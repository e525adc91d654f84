"""structlog JSON logging shared by every stage and the launcher.

LOG_LEVEL (default INFO) sets the threshold. Logs go to stderr; when LOG_DIR is set they are also
appended to LOG_DIR/<name>.jsonl. Nothing is written inside DVC outputs, so logs never change a hash.
"""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

import structlog

_configured = False


def get(name: str) -> structlog.stdlib.BoundLogger:
    """A JSON logger bound to `stage=name`; configures logging on first use."""
    global _configured
    if not _configured:
        level = os.environ.get("LOG_LEVEL", "INFO").upper()
        if level not in logging.getLevelNamesMapping():
            raise ValueError(f"LOG_LEVEL={level!r} is not a logging level (use DEBUG, INFO, WARNING or ERROR)")
        handlers: list[logging.Handler] = [logging.StreamHandler(sys.stderr)]
        if log_dir := os.environ.get("LOG_DIR"):
            Path(log_dir).mkdir(parents=True, exist_ok=True)
            handlers.append(logging.FileHandler(Path(log_dir) / f"{name}.jsonl", encoding="utf-8"))
        logging.basicConfig(level=level, format="%(message)s", handlers=handlers, force=True)
        structlog.configure(
            processors=[
                structlog.stdlib.filter_by_level,
                structlog.stdlib.add_log_level,
                structlog.processors.TimeStamper(fmt="iso", utc=True),
                structlog.processors.format_exc_info,
                structlog.processors.JSONRenderer(ensure_ascii=False),
            ],
            logger_factory=structlog.stdlib.LoggerFactory(),
            wrapper_class=structlog.stdlib.BoundLogger,
            cache_logger_on_first_use=True,
        )
        _configured = True
    return structlog.get_logger(name).bind(stage=name)
