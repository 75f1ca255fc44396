"""Analyses of tuned models: token distribution shift (``token_shift``), and the others of the study.

Submodules import torch and friends; import them directly (``from itlens.analysis.token_shift import
compute_shift``) so that ``import itlens.analysis`` stays cheap.
"""
