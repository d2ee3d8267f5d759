"""Phase 2: the DeepSpeed ZeRO-3 training engine for SFT and DoRA alignment (docs/design.md sections 5-7).

``config`` (YAML schema), ``data`` (tokenisation, sampler, collator), ``loading`` (the data of a run),
``model`` (the module DeepSpeed wraps), ``process_group`` (ranks), ``signals`` (stop requests), ``optim``
(optimizer and schedule), ``engine`` (the trainer's loop), ``ref_logps`` (reference pass and cache),
``startup`` (what a run does before its first step), ``checkpoint``, ``metrics``, ``export``, ``plots``;
``commands`` registers ``dora-engine train`` and ``dora-engine ref-logps``.
Heavy libraries (deepspeed, transformers) are imported inside functions.
"""
