"""Pipelines over the stage runner and the defence registry: training, the defence comparison (suite,
demo, sweep), screening, analysis, the alignment-set builder, memory plans and preflight checks."""
