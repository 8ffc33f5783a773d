"""Readers for weights and indexes written by other systems (t5x, t5x_retrieval, the Atlas
reference) and the `atlas-jax convert` export. Nothing here executes code from a file:
pickles go through `torch_pickle`'s allow-list, msgpack and zarr are plain data."""
