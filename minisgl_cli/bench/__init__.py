"""Benchmarks behind `minisgl bench`: workloads, offline throughput, batch latency, the transformers
baseline, and the report (rich tables + JSON). A library: it never imports the CLI.

Modules import torch and the engine inside functions where they can, so importing the package stays cheap.
"""
