"""The service's Prometheus metrics, in a registry of their own (one per app, so tests can run several)."""

import prometheus_client as prom

prom.disable_created_metrics()  # *_created series: noise for a scrape of one process
LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.2, 0.5, 1.0, 2.5, 5.0)  # seconds


class Metrics:
  """Request counts, latency histograms per query modality, encoder batch sizes and drops."""

  def __init__(self):
    self.registry = prom.CollectorRegistry()
    self.requests = prom.Counter("crucible_requests", "HTTP requests by endpoint, query modality and status",
                                 ("endpoint", "modality", "status"), registry=self.registry)
    self.latency = prom.Histogram("crucible_search_latency_seconds", "end-to-end /search latency by query modality",
                                  ("modality",), buckets=LATENCY_BUCKETS, registry=self.registry)
    self.batch_size = prom.Histogram("crucible_encoder_batch_size", "queries per encoder batch", ("modality",),
                                     buckets=(1, 2, 4, 8, 16, 32, 64), registry=self.registry)
    self.encode_seconds = prom.Histogram("crucible_encoder_batch_seconds", "encoder batch time", ("modality",),
                                         buckets=LATENCY_BUCKETS, registry=self.registry)
    self.dropped = prom.Counter("crucible_dropped_encodings", "query encodings shed by the priority scheduler",
                                ("modality",), registry=self.registry)

  def on_batch(self, modality: str, size: int, seconds: float) -> None:
    self.batch_size.labels(modality).observe(size)
    self.encode_seconds.labels(modality).observe(seconds)

  def render(self) -> tuple[bytes, str]:
    """(body, content type) of the Prometheus text exposition."""
    return prom.generate_latest(self.registry), prom.CONTENT_TYPE_LATEST
