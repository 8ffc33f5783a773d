"""`atlas-jax demo`: few-shot QA over a generated Beancount ledger, end to end (`pipeline`:
the stages and their order; `args`: its gin and saved arguments; `evaluation`: the systems'
scores; `report`: report.json / report.md / plots). docs/demo.md."""
from atlas_jax.demo.pipeline import (SYSTEMS, DemoConfig, add_arguments, run,  # noqa: F401
                                     run_demo)
from atlas_jax.ledger.filters import ledger_filter_parser  # noqa: F401 (runs saved before the move bind `@demo.ledger_filter_parser`)
