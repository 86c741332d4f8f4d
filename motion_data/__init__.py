"""motion_data: formats, label maps, numba kernels, Zarr store, shards, sampler, loader."""
