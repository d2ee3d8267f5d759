"""``dora-engine iterate``: iterative self-training with DoRA (docs/design.md section 10).

Rounds r = 1..R, each in its own folder: generate responses with the current policy, score them and merge
them into the round's data, calibrate h̃, align from the previous round's policy, evaluate on held-out
prompts; one chain per strategy, every step skipped when its manifest matches its inputs' content hash.
Modules: ``config`` (the YAML config), ``steps`` (manifests and content hashes), ``pipeline`` (the rounds),
``report`` (the final table and plot), ``commands`` (the sub-command), ``config_docs`` (its key table).
"""
