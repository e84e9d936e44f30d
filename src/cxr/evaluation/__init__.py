"""Evaluation: metrics with confidence intervals, `cxr evaluate`, the paper's figures and tables, model cards."""
