//! What an operator sees for a mistyped command line: the missing flags by
//! name, and Tessera's spelling of the SPIRE flags they typed. Nothing is
//! contacted; each is one line on stderr and exit code 2.
#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]

use std::process::Command;

const BIN: &str = env!("CARGO_BIN_EXE_tessera-server");

/// Runs the binary with `args`; its exit code and its stderr, which must be one line.
fn refused(args: &[&str]) -> String {
    let out = Command::new(BIN).args(args).output().unwrap();
    let stderr = String::from_utf8(out.stderr).unwrap();
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stderr}");
    assert_eq!(stderr.trim_end().lines().count(), 1, "{args:?}: not one line: {stderr}");
    assert!(out.stdout.is_empty(), "{args:?}");
    stderr
}

#[test]
fn a_missing_required_flag_is_named() {
    for (args, flag) in [
        (&["svid", "revoke"][..], "--serial"),
        (&["agent", "ban"], "--id"),
        (&["entry", "update"], "--id"),
        (&["entry", "delete"], "--id"),
    ] {
        let stderr = refused(args);
        assert!(stderr.contains(flag), "{args:?}: {stderr}");
    }
}

#[test]
fn spire_spellings_are_answered_with_tesseras() {
    let stderr = refused(&[
        "entry",
        "create",
        "-spiffeID",
        "spiffe://example.org/web",
        "-parentID",
        "spiffe://example.org/agent",
        "-selector",
        "unix:uid:1000",
    ]);
    for hint in [
        "-spiffeID is SPIRE's spelling; Tessera's is --spiffe-id",
        "-parentID is SPIRE's spelling; Tessera's is --parent-id",
        "-selector is SPIRE's spelling; Tessera's is --selector",
    ] {
        assert!(stderr.contains(hint), "{stderr}");
    }
    let stderr = refused(&["entry", "show", "-output", "json"]);
    assert!(stderr.contains("Tessera's is --json"), "{stderr}");
    let stderr = refused(&["entry", "show", "-socketPath", "/tmp/admin.sock"]);
    assert!(stderr.contains("Tessera's is --socket"), "{stderr}");
    let stderr = refused(&["entry", "create", "-federatesWith", "spiffe://other.org"]);
    assert!(stderr.contains("Tessera has no such option"), "{stderr}");
    // Per command: agents are named by --id, bundles take --format.
    let stderr = refused(&["agent", "evict", "-spiffeID", "spiffe://example.org/node/1"]);
    assert!(stderr.contains("Tessera's is --id"), "{stderr}");
    let stderr = refused(&["bundle", "show", "-format", "spiffe"]);
    assert!(stderr.contains("Tessera's is --format"), "{stderr}");
    let stderr = refused(&["agent", "purge", "-expiredFor", "24h", "-dryRun"]);
    assert!(stderr.contains("Tessera's is --expired-for"), "{stderr}");
    assert!(stderr.contains("Tessera's is --dry-run"), "{stderr}");
    let stderr = refused(&["healthcheck", "-shallow"]);
    assert!(stderr.contains("one mode"), "{stderr}");
    // A typo of Tessera's own flags keeps clap's tip, on the same line.
    let stderr = refused(&["entry", "show", "--spife-id", "x"]);
    assert!(stderr.contains("--spiffe-id"), "{stderr}");
}
