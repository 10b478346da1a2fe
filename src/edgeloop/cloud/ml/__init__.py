"""The cloud's half of the ML loop: dataset snapshots of the lake, training (a process pool,
or a Dask cluster), the model registry, and packaging a model version as a component."""
