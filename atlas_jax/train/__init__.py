"""Joint retriever-reader training: the config and loop (`trainer`), batch assembly (`data`),
the loss (`joint_loss`, `objectives`) and the optimizer (`optimization`). docs/design.md §1, §3."""
