"""An nginx configuration for a pod of the testbed: foreground, every file in one directory."""

from __future__ import annotations

TEMPLATE = """\
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections {workers}; }}
http {{
    access_log off;
    client_body_temp_path {dir}/client_body;
    proxy_temp_path {dir}/proxy;
    fastcgi_temp_path {dir}/fastcgi;
    uwsgi_temp_path {dir}/uwsgi;
    scgi_temp_path {dir}/scgi;
{http}
    server {{
        listen {port};
        listen [::]:{port};
        {server}
    }}
}}
"""


def nginx_config(directory: str, port: int, server: str, *, http: str = "",
                 worker_connections: int = 1024) -> str:
    """nginx.conf text: `server` goes inside the server block, `http` into the http block."""
    return TEMPLATE.format(dir=directory, port=port, server=server, http=http,
                           workers=worker_connections)
