"""Loads a loralab task's JSONL from this folder, wherever lm_eval runs (written by loralab)."""
import os

import datasets


def load(data_file, **_metadata):
    here = os.path.dirname(os.path.abspath(__file__))
    return datasets.load_dataset("json", data_files={"test": os.path.join(here, data_file)})
