"""loralab bounds oneDNN's primitive cache on import, unless the user chose a capacity."""
import os
import subprocess
import sys

import pytest

from loralab.runtime.onednn import PRIMITIVE_CACHE_CAPACITY

# bf16 matmuls of n_shapes distinct row counts, then the first shape again: does oneDNN still hold it?
PROBE = """
import loralab, os, torch
w = torch.randn(64, 64, dtype=torch.bfloat16)
for n in [*range(8, 8 * ({n_shapes} + 1), 8), 8]:
    torch.randn(n, 64, dtype=torch.bfloat16) @ w
print("capacity", os.environ.get("ONEDNN_PRIMITIVE_CACHE_CAPACITY"))
"""


def _run(env_extra: dict, n_shapes: int = 0):
    env = {k: v for k, v in os.environ.items() if not k.endswith("PRIMITIVE_CACHE_CAPACITY")}
    env.update(env_extra)
    out = subprocess.run([sys.executable, "-c", PROBE.format(n_shapes=n_shapes)], env=env, capture_output=True,
                         text=True, timeout=120, check=True)
    creates = [line.split(",")[3] for line in out.stdout.splitlines() if ",primitive,create:" in line]
    return out.stdout.splitlines()[-1], creates


@pytest.mark.parametrize(("env", "expected"), [
    ({}, str(PRIMITIVE_CACHE_CAPACITY)),
    ({"ONEDNN_PRIMITIVE_CACHE_CAPACITY": "5"}, "5"),
    ({"DNNL_PRIMITIVE_CACHE_CAPACITY": "7"}, "None"),  # oneDNN's older name: left to it, not overridden
])
def test_capacity_set_on_import_unless_the_user_chose(env, expected):
    assert _run(env)[0] == f"capacity {expected}"


def test_onednn_honours_the_bound():
    n = PRIMITIVE_CACHE_CAPACITY + 1  # one shape more than the cache holds: the first is evicted
    _, bounded = _run({"ONEDNN_VERBOSE": "2"}, n)
    if not bounded:
        pytest.skip("torch does not run bf16 matmuls through oneDNN on this CPU")
    _, unbounded = _run({"ONEDNN_VERBOSE": "2", "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "1024"}, n)
    assert bounded[-1] == "create:cache_miss" and unbounded[-1] == "create:cache_hit"
