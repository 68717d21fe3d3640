"""Engines of the locate-and-edit methods (ROME, MEMIT, AlphaEdit) and of GRACE and WISE:
``locate`` (shared hparams, module lookup), ``requests`` (requests as rows, key positions,
``KeySpec``), ``keys`` (reading activations at the keys), ``vstar`` (target vectors,
``VStarSettings``), ``stats`` (second moments, ``StatsSpec``), ``nullspace``, ``verify`` (target
NLL and the verification report) and ``adapters`` (what GRACE and WISE attach to a module)."""
