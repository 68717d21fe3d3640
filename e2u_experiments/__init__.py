"""Experiments on top of lm-eval results: sweeps, paper tables and figures, leaderboards.

``e2u sweep <config.yaml>`` runs a grid of lm-eval runs (one results folder each, resumable),
``e2u report <results dir>`` writes the paper's tables (Markdown, CSV) and figures (PNG),
``e2u leaderboard <results dir>`` freezes measured numbers into a leaderboard file, and
``e2u regress --leaderboard <file> --results <dir>`` checks results against it (for CI).
Reads only lm-eval's output files: no torch, no model.
"""
