"""Observation: structured logs, Prometheus metrics and OpenTelemetry traces.

Every layer above reports through it, so it sits low. May import: ``gateway.http``.
"""
