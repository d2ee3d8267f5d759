"""Phase 2: the DeepSpeed ZeRO-3 training engine for SFT and DoRA alignment (docs/design.md sections 5-7).

``config`` (YAML schema), ``data`` (tokenisation, sampler, collator), ``loading`` (the data of a run),
``model`` (the module DeepSpeed wraps), ``process_group`` (ranks), ``signals`` (stop requests), ``optim``
(optimizer and schedule), ``engine`` (the trainer's loop), ``ref_logps`` (reference pass and cache),
``startup`` (what a run does before its first step), ``checkpoint`` and ``digests``, ``metrics``, ``export``,
``plots``, ``config_docs`` (launch/README.md's key table); a run's processes and leftovers: ``output_lock``,
``lifeline``, ``run_state``, ``shared_memory``, ``deepspeed_ops``; ``commands`` registers
``dora-engine train`` and ``dora-engine ref-logps``.
Heavy libraries (deepspeed, transformers) are imported inside functions.
"""
