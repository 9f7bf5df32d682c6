"""Experiments: the run config and pipeline of `antidote run` (with its stage cache and report), and
`antidote compare` over a matrix of attack settings and seeds (matrix, rows, report, plots, plan, utility)."""
