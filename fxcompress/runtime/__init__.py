"""ONNX Runtime: sessions that report the provider that really ran, parity, timing."""

from fxcompress.runtime.parity import ParityReport, validate
from fxcompress.runtime.session import RuntimeSession, create_session
from fxcompress.runtime.timing import LatencyReport, benchmark, time_interleaved

__all__ = ["LatencyReport", "ParityReport", "RuntimeSession", "benchmark", "create_session", "time_interleaved", "validate"]
