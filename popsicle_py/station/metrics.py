"""``GET /metrics``: the board in Prometheus' text format (prometheus-client).

A collector reads the board when scraped (on the server's loop, where the board lives), so
nothing is counted twice and no metric can drift from the page.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from popsicle_py.station.board import STATES, Board


class BoardCollector(Collector):
    def __init__(self, board: Board) -> None:
        self.board = board

    def collect(self) -> Iterator[Metric]:
        board = self.board
        drives = CounterMetricFamily("popsicle_station_drives",
                                     "Drives finished in this session, by result",
                                     labels=["result"])
        for result in ("ok", "failed", "invalid", "rejected", "cancelled"):
            drives.add_metric([result], board.results.get(result, 0))
        yield drives
        yield CounterMetricFamily("popsicle_station_bytes_written",
                                  "Bytes written to drives in this session",
                                  value=board.bytes_written)
        batch = GaugeMetricFamily("popsicle_station_batch_drives",
                                  "Drives of the batch so far (journal included)",
                                  labels=["result"])
        for key in ("ok", "failed", "total"):
            batch.add_metric([key], board.counters[key])
        yield batch
        state = GaugeMetricFamily("popsicle_station_slot_state",
                                  "1 for each slot's current state", labels=["slot", "state"])
        write = GaugeMetricFamily("popsicle_station_write_speed_bytes",
                                  "Each slot's last write speed, bytes per second",
                                  labels=["slot"])
        verify = GaugeMetricFamily("popsicle_station_verify_speed_bytes",
                                   "Each slot's last verify speed, bytes per second",
                                   labels=["slot"])
        for tile in board.tiles.values():
            for name in STATES:
                state.add_metric([tile.label, name], 1.0 if tile.state == name else 0.0)
            speeds = ((tile.tracker.write_speed, tile.tracker.verify_speed)
                      if tile.tracker is not None else (None, None))
            if (speeds[0] or tile.write_speed) is not None:
                write.add_metric([tile.label], float(speeds[0] or tile.write_speed or 0))
            if (speeds[1] or tile.verify_speed) is not None:
                verify.add_metric([tile.label], float(speeds[1] or tile.verify_speed or 0))
        yield state
        yield write
        yield verify
        yield GaugeMetricFamily("popsicle_station_up_since_seconds",
                                "When the station started (Unix time)",
                                value=float(board.station.get("started", time.time())))


def registry_for(board: Board) -> CollectorRegistry:
    registry = CollectorRegistry(auto_describe=False)
    registry.register(BoardCollector(board))
    return registry


def render(registry: CollectorRegistry) -> bytes:
    return generate_latest(registry)
