"""Merging coefficients learned from unlabeled test inputs: AdaMerging."""
