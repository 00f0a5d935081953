"""py-spiffe X509Source must see a rotation.

Prints the current SVID's serial, then waits (up to 60 s) for the source to
hold an SVID with another serial and prints that one. Exits 1 if none comes.
"""
import time

from spiffe import X509Source

from common import emit, fail, serial_hex

with X509Source(timeout_in_seconds=30) as source:
    first = serial_hex(source.svid.leaf)
    emit(event="initial", spiffe_id=str(source.svid.spiffe_id), serial=first)
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        current = serial_hex(source.svid.leaf)
        if current != first:
            emit(event="rotated", spiffe_id=str(source.svid.spiffe_id), serial=current)
            break
        time.sleep(0.05)
    else:
        fail(f"X509Source still holds serial {first} after 60 s")
