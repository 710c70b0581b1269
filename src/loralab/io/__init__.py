"""Files in and out: models (resolve, fetch, load), atomic writes, and exports (a merged HF folder)."""
