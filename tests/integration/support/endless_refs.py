#!/usr/bin/env python3
"""A hostile git server for factoryd's integration tests: every request is answered with a
smart-HTTP ref advertisement that never ends.

Usage: endless_refs.py PORT CERT_FILE KEY_FILE EVERY_MS SENT_FILE

Serves https on 127.0.0.1:PORT. After the advertisement's first ref it sends one more ref line
every EVERY_MS milliseconds (0: as fast as the client takes them), for at most 30 s and
256 MiB per connection and 4 connections in all, and keeps the bytes sent so far in SENT_FILE.
"""
import socket
import ssl
import sys
import threading
import time

PORT, CERT, KEY, EVERY_MS, SENT = int(sys.argv[1]), sys.argv[2], sys.argv[3], int(sys.argv[4]), sys.argv[5]
LOCK = threading.Lock()
TOTAL = [0]


def count(n):
    with LOCK:
        TOTAL[0] += n
        with open(SENT, "w") as f:
            f.write(str(TOTAL[0]))


def pkt(payload):
    return b"%04x" % (len(payload) + 4) + payload


def chunk(data):
    """One HTTP/1.1 chunk (libgit2 reads a body of unknown length only when chunked)."""
    return b"%x\r\n%s\r\n" % (len(data), data)


def serve(conn):
    try:
        head = b""
        while b"\r\n\r\n" not in head and len(head) < 65536:
            data = conn.recv(4096)
            if not data:
                return
            head += data
        oid = b"1" * 40
        out = (
            b"HTTP/1.1 200 OK\r\nContent-Type: application/x-git-upload-pack-advertisement\r\n"
            b"Cache-Control: no-cache\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(
                pkt(b"# service=git-upload-pack\n")
                + b"0000"
                + pkt(oid + b" HEAD\0multi_ack side-band-64k ofs-delta symref=HEAD:refs/heads/main\n")
            )
        )
        conn.sendall(out)
        count(len(out))
        start, sent, i = time.monotonic(), len(out), 0
        per_batch = 1 if EVERY_MS else 512
        while time.monotonic() - start < 30 and sent < 256 << 20:
            batch = chunk(b"".join(
                pkt(oid + b" refs/heads/branch-%012d\n" % (i + k)) for k in range(per_batch)
            ))
            i += per_batch
            conn.sendall(batch)
            sent += len(batch)
            count(len(batch))
            if EVERY_MS:
                time.sleep(EVERY_MS / 1000)
    except OSError:
        pass
    finally:
        conn.close()


context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
context.load_cert_chain(CERT, KEY)
listener = socket.socket()
listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
listener.bind(("127.0.0.1", PORT))
listener.listen()
for _ in range(4):
    raw, _ = listener.accept()
    try:
        conn = context.wrap_socket(raw, server_side=True)
    except OSError:
        raw.close()
        continue
    threading.Thread(target=serve, args=(conn,), daemon=True).start()
time.sleep(60)
