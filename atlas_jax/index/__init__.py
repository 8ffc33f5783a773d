"""Passage index: store, device and ScaNN backends, filters, refresh (see DESIGN.md §2)."""
