"""spinserve.configs."""
