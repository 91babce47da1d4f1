"""Tools built on the stages: benchmarks, the quality comparison with SAELens, the soak test, `info`."""
