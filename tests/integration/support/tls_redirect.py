#!/usr/bin/env python3
"""An https server for factoryd's integration tests that answers every GET with a redirect.

Usage: tls_redirect.py PORT CERT_FILE KEY_FILE LOCATION

Serves https on 127.0.0.1:PORT; every GET gets "302 Found" with "Location: LOCATION".
"""
import http.server
import ssl
import sys

PORT, CERT, KEY, LOCATION = int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4]


class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"

    def log_message(self, *args):
        pass

    def do_GET(self):
        self.send_response(302)
        self.send_header("Location", LOCATION)
        self.send_header("Content-Length", "0")
        self.end_headers()


server = http.server.ThreadingHTTPServer(("127.0.0.1", PORT), Handler)
context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
server.socket = context.wrap_socket(server.socket, server_side=True)
server.serve_forever()
