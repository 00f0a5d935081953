//! Shared helpers for Tessera's end-to-end tests and benchmark.
#![forbid(unsafe_code)]
