"""Benchmarks: `make bench` runs them, stores JSON results in benchmarks/results/ and renders
docs/performance.md from all stored results, with the machine they came from."""
