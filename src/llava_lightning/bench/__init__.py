"""Benchmarks. `make bench` runs `loader`, `model_step`, `trainer_overhead` and `packing`: each prints
our figure, the named baseline's (for `packing`: the padded batches'), and their ratio. `gpu_sweep`
(FLOPs from `flops`, timing by `throughput`) measures throughput, peak memory and MFU under each
sharding strategy on a GPU."""
