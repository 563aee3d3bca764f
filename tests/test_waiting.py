"""Waiting for a server that is not up yet (`--wait`): the rule mnistlab.util.waiting gives both servers."""

from __future__ import annotations

import threading
import time

import pytest


@pytest.mark.slow  # it waits for real: a server that comes up late, one that never does (6 s)
def test_waiting_for_a_tracking_server_that_comes_up_late_and_one_that_never_does(
        capsys: pytest.CaptureFixture) -> None:
    """`--wait`: one line on stderr, retries every 2 s; a real HTTP server answering /health
    after 1 s ends the wait, a port nobody listens on ends it with one error line."""
    import http.server
    import socket

    from conftest import HealthHandler
    from mnistlab.tracking.uri import check_reachable
    from mnistlab.util.errors import UserError

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    servers = []

    def start_late() -> None:  # the port is closed for the first second: connections are refused
        servers.append(http.server.HTTPServer(("127.0.0.1", port), HealthHandler))
        servers[0].serve_forever()

    threading.Timer(1.0, start_late).start()
    try:
        check_reachable(f"http://127.0.0.1:{port}", wait=30)
    finally:
        while not servers:
            time.sleep(0.05)
        servers[0].shutdown()
        servers[0].server_close()
    err = capsys.readouterr().err
    assert err.count("waiting for the MLflow server") == 1 and "retrying for up to 30 s" in err, err
    with pytest.raises(UserError, match=r"is unreachable .* after waiting 3 s; nothing was trained"):
        check_reachable(f"http://127.0.0.1:{port}", wait=3)
