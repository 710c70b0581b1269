"""Experiment tracking: the run's metrics, hyper-parameters and summary, fanned out to the sinks
`train.report_to` names (jsonl: metrics.jsonl; tensorboard; mlflow)."""
