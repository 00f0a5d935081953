"""Helpers shared by the interop scripts (run by tests/tests/python_interop.rs)."""
import json
import sys


def serial_hex(cert):
    """A certificate serial the way Tessera prints it: lowercase hex, whole bytes."""
    text = format(cert.serial_number, "x")
    return text if len(text) % 2 == 0 else "0" + text


def emit(**fields):
    """One JSON line on stdout, flushed at once (the Rust test reads it live)."""
    print(json.dumps(fields), flush=True)


def fail(message):
    print(message, file=sys.stderr, flush=True)
    sys.exit(1)
