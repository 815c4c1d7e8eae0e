"""Peer tests: real third-party clients (libiscsi, qemu-img) against a real trioscsi server.

`harness` starts servers (trioscsi, and tgtd for comparisons), `cu_results` runs and parses
libiscsi's iscsi-test-cu. Both are also used by scripts/conformance and scripts/bench.
"""
