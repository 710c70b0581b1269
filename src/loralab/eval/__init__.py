"""Evaluation of a model (plus adapter): exact match on held-out tasks by greedy generation."""
