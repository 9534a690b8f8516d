"""The error a user can fix, and how a stage reports it: one line on stderr that
starts with ERROR_PREFIX, exit status EXIT_ERROR; an interrupted stage exits with
EXIT_INTERRUPTED. The multi-process launcher reads the same values in its workers'
output (src/pipeline/distributed.py), so they are defined here, once.
"""

from __future__ import annotations

ERROR_PREFIX = "error: "
EXIT_ERROR = 1
EXIT_INTERRUPTED = 130  # as a shell reports a process stopped by Ctrl-C (128 + SIGINT)


class PipelineError(Exception):
    """An error the user can fix (bad params, bad data, missing device): shown as one line."""
