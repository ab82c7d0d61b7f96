"""flannelpy's benchmark harness: `python -m benchmarks [all|datapath|controlplane|packetcore] [--quick]`.

docs/benchmarks.md holds the latest numbers and the commands that produced them.
"""
