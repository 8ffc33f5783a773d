"""SeqIO task and mixture registrations; installed as `atlas_jax_tasks`.

Tasks (QA, pretraining, multiple choice, ledger QA) are registered by the tasks issue.
"""
