"""pytest-fdcluster: test prefork servers that hand client sockets to workers.

The public API, for users' own scenarios: the fixtures ``fdcluster``,
``fdcluster_factory``, ``fdcluster_payloads`` and the ``fdcluster`` marker
(from the plugin), plus what this package exports below: the cluster and its
client, the fault injectors (``faults``), the load generator (``load``), what
processes consume (``resources``), what a target declares (``Capabilities``,
``require``), hostile frames and their judge (``hostile``), fairness statistics
with stated power (``stats``) and the assertions.  Everything else is internal.
"""

from fdcluster_server import protocol  # the one framing implementation, for frames built by hand

from . import faults, hostile, load, resources, stats
from .capabilities import Capabilities, CapabilityMissing, require
from .checks import (
    CheckFailed,
    FairnessError,
    FairnessStats,
    FdHygieneError,
    FdLeakError,
    assert_fair,
    assert_master_holds_no_clients,
    assert_no_close_wait,
    assert_no_fd_growth,
    assert_no_fd_leak,
    assert_round_robin,
    fairness,
    format_distribution,
)
from .client import Client, ClientError, ClientTimeout, ConnectionClosed, RemoteError
from .cluster import Cluster, ClusterError, ClusterFactory, GracefulStopError, process_alive, wait_until
from .observe import ObservationError, ObservationSkipped, Snapshot, snapshot
from .settings import ClusterSettings
from .target import StopResult, TargetStartupError

__version__ = "0.1.0"

__all__ = [
    "Capabilities", "CapabilityMissing", "require",
    "CheckFailed", "Client", "ClientError", "ClientTimeout", "Cluster", "ClusterError", "ClusterFactory",
    "ClusterSettings", "ConnectionClosed", "FairnessError", "FairnessStats", "FdHygieneError", "FdLeakError",
    "GracefulStopError", "ObservationError", "ObservationSkipped", "RemoteError", "Snapshot", "StopResult",
    "TargetStartupError", "assert_fair", "assert_master_holds_no_clients",
    "assert_no_close_wait", "assert_no_fd_growth", "assert_no_fd_leak", "assert_round_robin", "fairness",
    "faults", "format_distribution", "hostile", "load", "process_alive", "protocol", "resources", "snapshot",
    "stats", "wait_until",
]
