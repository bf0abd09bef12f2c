"""spinserve.perf."""
