"""Ledger glue: question answering over a Beancount ledger with a trained demo run (`qa`,
`sync`, `checks`, `serve`), the ledger filter parser (`filters`), and the recipes of the
shipped ledger reader and retriever (`reader_pretrain`, `retriever_pretrain` and their
exports). The only `atlas_jax` package besides `demo` and `cli` that imports the task
package (`atlas_jax_tasks`). docs/design.md §6."""
