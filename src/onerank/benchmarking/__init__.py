"""Reproducible benchmark suites: YAML definitions, runner, tables, paired tests and plots (``onerank benchmark``)."""

from onerank.benchmarking.runner import SuiteRunner, run_benchmark
from onerank.benchmarking.suite import Suite, file_sha256, load_suite

__all__ = ["Suite", "SuiteRunner", "file_sha256", "load_suite", "run_benchmark"]
