"""Failures made to happen on purpose, for tests of request-level isolation.

With SHARDLM_FAULT_INJECTION=1 in the environment of the driver and the ranks (it is forwarded
to them), a request whose `SamplingParams.extra_args` holds {"shardlm_fault": WHERE} fails at
WHERE: "sample" on rank 0 while its token is sampled, "detokenize" in the driver while its text
is made. Without the variable the key is ignored, and the checks cost nothing: they run when a
sequence arrives, not in a step.
"""

from __future__ import annotations

import os
from typing import Any

FAULTS_ENV = "SHARDLM_FAULT_INJECTION"
FAULT_KEY = "shardlm_fault"
WHERES = ("sample", "detokenize")


class InjectedFault(RuntimeError):
    """The failure a test asked for."""


def faults_enabled() -> bool:
    return os.environ.get(FAULTS_ENV, "0") == "1"


def wants_fault(params: Any, where: str) -> bool:
    """Whether a request with these SamplingParams asked to fail at `where` (and faults are on)."""
    extra = getattr(params, "extra_args", None)
    return bool(extra) and extra.get(FAULT_KEY) == where and faults_enabled()
