"""Memory: measuring a phase's peak (measure.py), a model's shape from its config (arch.py), and the
analytic estimate of a run's peak before it starts (estimate.py)."""
