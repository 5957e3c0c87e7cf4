"""Operator and test tools that drive the real fdqueue processes (chaos runs, benchmarks)."""
