"""A minimal HTTP/2 client with no dependencies (standard library only), for
tests that need a caller whose executable is a particular file (a copy of
the Python interpreter). Sends one FetchX509SVID request on the socket in
argv[1], prints "sent", waits for the first HEADERS or DATA frame of the
response and prints "answered"."""
import socket
import sys


def frame(kind, flags, stream, payload):
    return len(payload).to_bytes(3, "big") + bytes([kind, flags]) + stream.to_bytes(4, "big") + payload


def literal(name, value):
    # HPACK literal without indexing, new name, no Huffman (lengths < 127).
    return b"\x00" + bytes([len(name)]) + name + bytes([len(value)]) + value


headers = b"".join(
    literal(n, v)
    for n, v in [
        (b":method", b"POST"),
        (b":scheme", b"http"),
        (b":path", b"/SpiffeWorkloadAPI/FetchX509SVID"),
        (b":authority", b"localhost"),
        (b"content-type", b"application/grpc"),
        (b"te", b"trailers"),
        (b"workload.spiffe.io", b"true"),
    ]
)
conn = socket.socket(socket.AF_UNIX)
conn.connect(sys.argv[1])
conn.sendall(
    b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
    + frame(0x4, 0, 0, b"")
    + frame(0x1, 0x4, 1, headers)
    + frame(0x0, 0x1, 1, b"\x00\x00\x00\x00\x00")
)
print("sent", flush=True)
buffer = b""
while True:
    data = conn.recv(65536)
    if not data:
        print("closed", flush=True)
        sys.exit(1)
    buffer += data
    while len(buffer) >= 9:
        length = int.from_bytes(buffer[:3], "big")
        if len(buffer) < 9 + length:
            break
        kind, stream = buffer[3], int.from_bytes(buffer[5:9], "big") & 0x7FFFFFFF
        if kind == 0x4 and buffer[4] & 0x1 == 0:
            conn.sendall(frame(0x4, 0x1, 0, b""))  # SETTINGS ACK
        if stream == 1 and kind in (0x0, 0x1):
            print("answered", flush=True)
            sys.exit(0)
        buffer = buffer[9 + length:]
