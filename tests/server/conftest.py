"""Tests of the server stack as a process, over a fake engine (`server_fakes.py`): the real
FastAPI app, admission, streaming and error paths, with a scripted model so each runs in seconds.
`server_harness.py` starts and polls these servers (and tests/e2e's real ones)."""
