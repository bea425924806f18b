"""Placeholder: probes are being written."""
