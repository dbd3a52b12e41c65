#!/usr/bin/env python3
"""A distribution token service for the integration tests (token auth, RS256 JWTs).

Usage: token_service.py PORT KEY_PEM CERT_PEM ISSUER SERVICE USER:PASSWORD...

Grants pull and push on any repository to the listed users (HTTP Basic on the token request)
and no access at all to anonymous requests, so the registry then refuses them. The JWT carries
the certificate in its x5c header, which the registry checks against its rootcertbundle.
Signing uses the openssl command line, so nothing beyond the standard library is needed.
"""
import base64
import http.server
import json
import subprocess
import sys
import time
import urllib.parse


def b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def main() -> None:
    port, key, cert, issuer, service = sys.argv[1:6]
    users = dict(u.split(":", 1) for u in sys.argv[6:])
    with open(cert) as f:
        pem = "".join(line for line in f if not line.startswith("-----"))
    x5c = pem.replace("\n", "")

    class Handler(http.server.BaseHTTPRequestHandler):
        def log_message(self, *args):
            pass

        def do_GET(self):
            url = urllib.parse.urlparse(self.path)
            query = urllib.parse.parse_qs(url.query)
            user = None
            header = self.headers.get("Authorization", "")
            if header.startswith("Basic "):
                try:
                    name, password = base64.b64decode(header[6:]).decode().split(":", 1)
                except Exception:
                    name, password = "", None
                if users.get(name) != password:
                    self.send_response(401)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                user = name
            access = []
            if user is not None:
                for scope in query.get("scope", []):
                    for part in scope.split(" "):
                        kind, _, rest = part.partition(":")
                        name, _, actions = rest.rpartition(":")
                        access.append({"type": kind, "name": name,
                                       "actions": [a for a in actions.split(",") if a]})
            now = int(time.time())
            claims = {"iss": issuer, "sub": user or "", "aud": query.get("service", [service])[0],
                      "exp": now + 300, "nbf": now - 10, "iat": now, "jti": str(time.time_ns()),
                      "access": access}
            head = {"typ": "JWT", "alg": "RS256", "x5c": [x5c]}
            signing_input = b64url(json.dumps(head).encode()) + "." + b64url(json.dumps(claims).encode())
            signature = subprocess.run(["openssl", "dgst", "-sha256", "-sign", key],
                                       input=signing_input.encode(), capture_output=True,
                                       check=True).stdout
            token = signing_input + "." + b64url(signature)
            body = json.dumps({"token": token, "access_token": token, "expires_in": 300}).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

    http.server.ThreadingHTTPServer(("127.0.0.1", int(port)), Handler).serve_forever()


if __name__ == "__main__":
    main()
