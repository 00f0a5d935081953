//! What a user sees for a mistyped `tessera-agent` command line: the
//! missing flags by name, and Tessera's spelling of SPIRE's agent flags.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-agent");

fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
    stderr
}

#[test]
fn a_missing_required_flag_is_named() {
    let stderr = refused(&["api", "fetch", "jwt"]);
    assert!(stderr.contains("--audience"), "{stderr}");
}

#[test]
fn spire_spellings_are_answered_with_tesseras() {
    let stderr = refused(&["api", "fetch", "-socketPath", "/tmp/api.sock", "-write", "/tmp/svid"]);
    assert!(stderr.contains("-socketPath is SPIRE's spelling; Tessera's is --socket"), "{stderr}");
    assert!(stderr.contains("-write is SPIRE's spelling; Tessera's is --write"), "{stderr}");
    let stderr =
        refused(&["api", "fetch", "jwt", "-audience", "db", "-spiffeID", "spiffe://example.org/w"]);
    assert!(stderr.contains("Tessera's is --audience"), "{stderr}");
    assert!(stderr.contains("Tessera's is --spiffe-id"), "{stderr}");
    // A SPIRE flag this command lacks is named as such, not as `-c`.
    let stderr = refused(&["run", "-config", "agent.conf"]);
    assert!(stderr.contains("-config is not a flag of this command"), "{stderr}");
}
