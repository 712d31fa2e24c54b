"""The pipeline machinery above the ML core: the stage contract and plans (stages), stage identity (identity),
the artifact store (artifacts), remote checkpoints, presets, launching processes, and the report card.

Nothing in the ML core imports this package, so none of it is part of a stage's identity: editing the store
or the report re-runs nothing (see identity.py).
"""
