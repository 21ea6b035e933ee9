"""What the master tells the control socket: its figures and each worker's (``control.ControlSource``).

Read-only views of the master's records, kept apart so the supervisor module
holds only the supervising.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Dict, List, Set

from . import channel as ch

if TYPE_CHECKING:
    from .master import Master


class MasterControlSource:
    """The ``ControlSource`` the control socket asks: counters, the worker table, stats."""

    def __init__(self, master: Master) -> None:
        self.master = master

    def request_counters(self, query_id: int) -> Set[int]:
        """Ask every ready worker for its counters; the indexes asked."""
        asked = set()
        for process in self.master.live_processes():
            if process.channel is not None and process.ready:
                asked.add(process.index)
                self.master.send_record(process, ch.STATS, query_id)
        return asked

    def worker_table(self) -> List[Dict[str, int]]:
        return [{"index": process.index, "pid": process.pid} for process in self.master.live_processes()]

    def stats(self, counters: Dict[int, Dict[str, Any]]) -> Dict[str, Any]:
        """The master's figures and each worker's, merged by worker index."""
        workers = []
        for index, slot in self.master.slots.items():
            live = self.master.dispatcher.workers.get(index)
            entry: Dict[str, Any] = {"index": index, "pid": slot.process.pid if slot.process else None,
                                     "respawns": slot.respawns, "reported": index in counters}
            if live is not None:
                entry.update(handed=live.handed, acked=live.acked, unacked=len(live.unacked),
                             rejected_by_worker=live.rejected)
            entry.update(counters.get(index, {}))
            workers.append(entry)
        m, d = self.master, self.master.dispatcher
        master = {"pid": m.pid, "strategy": m.config.strategy, "accepted": d.accepted, "pending": len(d.pending),
                  "held": d.held, "redistributed": d.redistributed, "rejected_closed": d.rejected_closed,
                  "deaths": m.deaths, "spawn_failures": m.spawn_failures, "heartbeat_kills": m.heartbeat_kills,
                  "respawns": sum(slot.respawns for slot in m.slots.values()), "stopping": m.stopping}
        return {"master": master, "workers": workers}

