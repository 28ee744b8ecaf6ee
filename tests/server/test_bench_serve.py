"""`tokenmill bench serve` against the fake-engine server: it completes every request and its
numbers are consistent with what was asked (a smoke test; benchmarks never assert on time)."""

from __future__ import annotations

import argparse
import json

import pytest

from server_harness import start_fake_server
from tokenmill.benchmarks import serve as bench_serve

pytestmark = pytest.mark.slow


def test_bench_serve_against_fake_server(tmp_path):
    srv = start_fake_server()
    try:
        parser = argparse.ArgumentParser()
        bench_serve.add_parser(parser.add_subparsers())
        result_file = tmp_path / "out.json"
        args = parser.parse_args([
            "serve", "--port", str(srv.port), "--num-prompts", "12", "--random-input-len", "8",
            "--random-output-len", "5", "--random-vocab-size", "1000", "--max-concurrency", "3",
            "--request-rate", "50", "--ignore-eos", "--result-file", str(result_file)])
        summary = bench_serve.run(args)
    finally:
        srv.stop()
    assert summary["completed"] == 12 and summary["failed"] == 0
    assert summary["total_input_tokens"] == 12 * 8 and summary["total_output_tokens"] == 12 * 5
    assert summary["ttft_ms"]["median"] > 0 and summary["itl_ms"]["p99"] >= summary["itl_ms"]["median"]
    saved = json.loads(result_file.read_text())
    assert saved["results"]["completed"] == 12 and len(saved["per_request"]) == 12
    assert all(r["output_tokens"] == 5 and len(r["itl_s"]) == 4 for r in saved["per_request"])
