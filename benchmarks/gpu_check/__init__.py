"""`make gpu-check`'s parts (benchmarks/gpu_check.py runs them): every CUDA path against its CPU / fp32
reference (paths.py), DDP and FSDP2 over nccl (dist_check.py, dist_worker.py), the article's 7B rows and the
estimate's grid measured (memory_rows.py), speed against the GPU stacks (stacks.py), the report (report.py)."""
