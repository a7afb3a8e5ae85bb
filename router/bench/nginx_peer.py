"""The `nginx` peer of `router bench --peers`: Debian's nginx as a plain reverse proxy in front of
the same fast upstream, run as our own process from a generated nginx.conf in a temp dir."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

from router.bench.harness import ROUTER_CPU, Machine, Processes, wait_ready
from router.bench.peer_process import Started
from router.bench.redis_server import free_port


def nginx_binary() -> str | None:
    """Debian installs it in /usr/sbin, which a non-root PATH may lack."""
    found = shutil.which("nginx")
    if found:
        return found
    return "/usr/sbin/nginx" if Path("/usr/sbin/nginx").exists() else None


def nginx_conf(listen_port: int, upstream_port: int, workdir: Path, connections: int) -> str:
    """One worker, no daemon, nothing outside `workdir`; `proxy_pass` to a keep-alive upstream
    pool with response buffering off (a streaming proxy, as the router is). `connections`:
    client plus upstream connections the worker must hold (the open-streams figure)."""
    d = workdir
    return f"""\
daemon off;
master_process off;
worker_processes 1;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
worker_rlimit_nofile {connections + 64};

events {{
    worker_connections {connections};
}}

http {{
    access_log off;
    client_body_temp_path {d}/client_body;
    proxy_temp_path {d}/proxy;
    fastcgi_temp_path {d}/fastcgi;
    uwsgi_temp_path {d}/uwsgi;
    scgi_temp_path {d}/scgi;
    # The router keeps a client connection for as many requests as it carries: so does this.
    keepalive_requests 10000000;
    keepalive_timeout 120s;

    upstream fast {{
        server 127.0.0.1:{upstream_port};
        keepalive 64;
        keepalive_requests 10000000;
    }}

    server {{
        listen 127.0.0.1:{listen_port} backlog=4096;
        location / {{
            proxy_pass http://fast;
            proxy_http_version 1.1;
            proxy_set_header Connection "";
            proxy_buffering off;
            proxy_read_timeout 300s;
        }}
    }}
}}
"""


def start_nginx(procs: Processes, machine: Machine, tmp: Path, upstream_port: int,
                open_streams: int) -> Started:
    """nginx on the router's CPU; raises RuntimeError when it does not answer."""
    binary = nginx_binary()
    if binary is None:
        raise FileNotFoundError("nginx is not installed (`make bench-deps` installs it)")
    workdir = tmp / "nginx"
    workdir.mkdir(exist_ok=True)
    port = free_port()
    conf = workdir / "nginx.conf"
    conf.write_text(nginx_conf(port, upstream_port, workdir, 2 * open_streams + 1024))
    log = workdir / "stderr.log"
    with log.open("wb") as err:
        # -e: errors before the config's error_log is read go to the temp dir, not /var/log
        proc = procs.start(machine.on(ROUTER_CPU, [binary, "-p", str(workdir), "-c", str(conf),
                                                   "-e", str(workdir / "error.log")]),
                           stdout=err, stderr=subprocess.STDOUT)
    wait_ready(proc, port, [log, workdir / "error.log"], 15)
    version = subprocess.run([binary, "-v"], capture_output=True, text=True, check=False)
    return Started(proc, port, (version.stderr or version.stdout).strip().replace(
        "nginx version: ", ""), log)
