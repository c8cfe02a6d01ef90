"""Models as unit chains: cut, build and load shards, checkpoints, per-unit profiling and its cache."""
