"""Chaos testing: record handler calls and faults, then check the history (internal).

Private on purpose: this is the project's own reliability suite (issue 7), not user API
(that is `trio_sessions.testing`). It lives in the package, not next to the tests, so the
in-process tests, the worker processes of ``nox -s chaos`` (``benchmarks/chaos.py``)
and the checker all import the one installed copy.
"""

from __future__ import annotations

from ._checker import BrokerState as BrokerState
from ._checker import Duplicate as Duplicate
from ._checker import OrderViolation as OrderViolation
from ._checker import Overlap as Overlap
from ._checker import Report as Report
from ._checker import check_history as check_history
from ._history import FORCED_RELEASE_FAULTS as FORCED_RELEASE_FAULTS
from ._history import LOCK_LOSS_FAULTS as LOCK_LOSS_FAULTS
from ._history import OBSERVED_FAULTS as OBSERVED_FAULTS
from ._history import Call as Call
from ._history import Fault as Fault
from ._history import History as History
from ._history import HistoryWriter as HistoryWriter
from ._history import Outcome as Outcome
from ._history import read_history as read_history
from ._recorder import Recorder as Recorder
