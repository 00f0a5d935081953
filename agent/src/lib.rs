//! Tessera's node agent. Not built yet: see issue 3 (node agent and the
//! SPIFFE Workload API).
#![forbid(unsafe_code)]
