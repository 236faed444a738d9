"""An nginx configuration for a pod of the testbed: foreground, every file in one directory.

``nginx_config`` renders a server block of the caller's; ``h2c_config`` renders the
HTTP/2 cleartext backend of the L7 tests (nginx-light has http_v2).  Run either with
``nginx -p DIR -c DIR/nginx.conf -e DIR/error.log`` (``nginx_argv``).
"""

from __future__ import annotations

import os

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
        listen {port}{listen};
        listen [::]:{port}{listen};
        {server}
    }}
}}
"""

# Statuses h2c_config answers at /status/<code> (nginx's `return` takes a literal code).
H2C_STATUSES = (200, 204, 400, 403, 404, 429, 500, 502, 503, 504)


def nginx_config(directory: str, port: int, server: str, *, http: str = "",
                 worker_connections: int = 1024, listen: str = "") -> str:
    """nginx.conf text: `server` goes inside the server block, `http` into the http block,
    `listen` after the port of both listen directives (e.g. " http2")."""
    return TEMPLATE.format(dir=directory, port=port, server=server, http=http,
                           workers=worker_connections,
                           listen=f" {listen.strip()}" if listen.strip() else "")


def h2c_config(directory: str, port: int, name: str) -> str:
    """nginx.conf of an HTTP/2 cleartext server, prior knowledge only (``listen PORT
    http2`` without TLS: HTTP/1.1 requests fail), every response with
    ``x-backend: NAME`` and text/plain bodies:

    - ``/status/<code>``: that status for the codes of H2C_STATUSES, body ``NAME <code>``;
    - ``/request``: ``NAME <method> <uri> <protocol> host=<$host> x-test=<x-test header>``:
      what reached nginx;
    - anything else: 200, ``NAME`` and a newline.
    """
    q = name.replace("\\", "\\\\").replace('"', '\\"')
    locations = [f'location = /status/{code} {{ return {code} "{q} {code}\\n"; }}'
                 for code in H2C_STATUSES]
    locations.append('location = /request { return 200 "' + q + ' $request_method '
                     '$request_uri $server_protocol host=$host x-test=$http_x_test\\n"; }')
    locations.append(f'location / {{ return 200 "{q}\\n"; }}')
    server = f'add_header x-backend "{q}" always;\n        ' + "\n        ".join(locations)
    return nginx_config(directory, port, server, listen="http2",
                        http="    default_type text/plain;\n    http2_max_concurrent_streams 1024;")


# What guarded_config's locations answer: a test that finds one of these bodies in a
# response knows which location nginx resolved the request to.
GUARDED_BODIES = {"admin": "ADMIN-SECRET", "member": "MEMBER-AREA", "public": "PUBLIC-PAGE",
                  "other": "OTHER-PAGE"}


def guarded_config(directory: str, port: int, name: str, *, http2: bool = False) -> str:
    """nginx.conf of the backend the adversarial tests attack (tests/integration/hostile.py):
    HTTP/1.1 (or HTTP/2 cleartext, prior knowledge, with ``http2``), every request logged
    as one JSON line in ``DIR/access.log`` with what nginx itself made of it (``request``:
    the request line as received, ``uri``: nginx's normalized path, ``request_uri``,
    ``x_role``: the first x-role header, as nginx reads repeated headers), and answered by
    location:

    - ``/admin``, ``/admin/...``: 200 ``ADMIN-SECRET`` (what a DENY policy guards);
    - ``/member/...``: 200 ``MEMBER-AREA``;
    - ``/public/...``: 200 ``PUBLIC-PAGE``;
    - anything else: 200 ``OTHER-PAGE``.

    nginx resolves ``//``, ``/./``, ``/../`` and percent-escapes (``%2F`` too) in ``uri`` its
    own way (merge_slashes on, the default), which is the point: the proxy must check
    what nginx will act on.
    """
    q = name.replace("\\", "\\\\").replace('"', '\\"')
    b = GUARDED_BODIES
    locations = [
        f'location = /admin {{ return 200 "{b["admin"]} {q}\\n"; }}',
        f'location /admin/ {{ return 200 "{b["admin"]} {q}\\n"; }}',
        f'location /member/ {{ return 200 "{b["member"]} {q}\\n"; }}',
        f'location /public/ {{ return 200 "{b["public"]} {q}\\n"; }}',
        f'location / {{ return 200 "{b["other"]} {q}\\n"; }}',
    ]
    log_format = ("log_format guarded escape=json '{\"request\":\"$request\","
                  "\"uri\":\"$uri\",\"request_uri\":\"$request_uri\","
                  "\"method\":\"$request_method\",\"status\":$status,"
                  "\"host\":\"$host\",\"x_role\":\"$http_x_role\","
                  "\"protocol\":\"$server_protocol\"}';")
    http = (f"    default_type text/plain;\n    {log_format}\n"
            f"    access_log {directory}/access.log guarded;\n"
            "    http2_max_concurrent_streams 1024;\n    keepalive_requests 100000;")
    server = "\n        ".join(locations)
    return TEMPLATE.replace("    access_log off;\n", "").format(
        dir=directory, port=port, server=server, http=http, workers=4096,
        listen=" http2" if http2 else "")


def nginx_argv(directory: str, conf: str | None = None, nginx: str = "nginx") -> list[str]:
    """argv of nginx in the foreground with every file in ``directory``."""
    return [nginx, "-p", directory, "-c", conf or os.path.join(directory, "nginx.conf"),
            "-e", os.path.join(directory, "error.log")]
