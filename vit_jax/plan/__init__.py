"""Ahead-of-time plans of the real train step for a topology (`python -m vit_jax.plan`).

  core.make_plan(config, topology) -> Plan   memory per chip, FLOPs, collectives, roofline time
  suggest.suggest(config, topology)          meshes x remat x accumulation that fit, ranked
  topologies.parse('v5e-16')                 topology names and the chip figures (with sources)
  hlo.collectives(compiled_text, n)          collective bytes of a compiled module

Importing this package does not import JAX (the CLI must set XLA_FLAGS first).
"""
