"""Studies: a preset (spec.py, presets/*.yaml) expanded into cells x seeds, run (runner.py), read back
(results.py, stats.py) and reported (report.py, plots.py)."""
