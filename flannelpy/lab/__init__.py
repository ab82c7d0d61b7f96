"""Real servers and namespaces for tests, the demo and benchmarks (not used by the daemon)."""
