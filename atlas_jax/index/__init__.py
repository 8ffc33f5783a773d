"""Passage index: store, device and ScaNN backends, filters, refresh (see docs/design.md §2)."""
