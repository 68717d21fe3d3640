"""Engines of the locate-and-edit methods (ROME, MEMIT, AlphaEdit) and of GRACE and WISE: edit
requests and their keys, v*, covariance statistics, null spaces, and the adapters that GRACE and
WISE attach to a module."""
