import torch

from loralab.memory.measure import PeakMemory, fmt_bytes


def test_peak_counts_the_phase_not_what_came_before():
    big = torch.ones(300 * 2**20 // 4)  # 300 MB before the phase, then freed
    del big
    with PeakMemory("cpu") as pm:
        x = torch.ones(100 * 2**20 // 4)  # 100 MB inside the phase, touched
        x += 1
        del x
    r = pm.result()
    grew = r["peak_memory_bytes"] - r["memory_at_start_bytes"]
    assert 80 * 2**20 < grew < 160 * 2**20, fmt_bytes(grew)


def test_fmt_bytes():
    assert fmt_bytes(512) == "512 B"
    assert fmt_bytes(1.5 * 2**30) == "1.50 GiB" and fmt_bytes(3 * 2**20) == "3.00 MiB"
