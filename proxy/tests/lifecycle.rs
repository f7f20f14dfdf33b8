//! The built binary serves health and metrics, is unready without an API
//! server, and exits cleanly within a second of SIGTERM.

#[test]
fn serves_health_and_stops_on_sigterm() {
    ferrolb_runtime::testing::assert_lifecycle(
        std::path::Path::new(env!("CARGO_BIN_EXE_ferrolb-proxy")),
        &["--node-name=node-1", "--healthz-bind-address=127.0.0.1:0"],
    );
}
