//! The speaker suite of `speaker.rs`, run with the real kube-proxy as the
//! data plane: the suite picks its proxy from this crate's name. A module
//! rather than a second target on the same file, so cargo builds each
//! source file once.

#[path = "speaker.rs"]
mod suite;

fn main() -> std::process::ExitCode {
    suite::main()
}
