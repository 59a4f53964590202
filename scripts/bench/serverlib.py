"""What the serving benchmarks share (bench-serve.sh, bench-serve-lookup.sh): a free
port, and waiting for a server's /health to answer 200."""
import http.client
import socket
import time


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def wait_ready(port, proc):
    """Waits up to two minutes for `proc` (a Popen) to answer GET /health with 200."""
    for _ in range(1200):
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.returncode}")
        try:
            c = http.client.HTTPConnection("127.0.0.1", port, timeout=2)
            c.request("GET", "/health")
            resp = c.getresponse()
            resp.read()
            if resp.status == 200:
                return
        except OSError:
            pass
        time.sleep(0.1)
    raise SystemExit("server did not become ready")
