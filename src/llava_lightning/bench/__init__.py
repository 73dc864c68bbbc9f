"""Benchmarks. `make bench` runs `loader`, `model_step` and `trainer_overhead`: each prints our figure,
the named baseline's, and their ratio. `gpu_sweep` (FLOPs from `flops`, timing by `throughput`)
measures throughput, peak memory and MFU under each sharding strategy on a GPU."""
