"""Cost of CurvatureCallback per save and as a share of training time (``python -m benchmarks.capture_overhead``)."""
