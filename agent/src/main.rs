//! `tessera-agent`: not built yet (issue 3).
#![forbid(unsafe_code)]

fn main() -> std::process::ExitCode {
    eprintln!("error: tessera-agent is not implemented yet (see issue 3)");
    std::process::ExitCode::from(2)
}
