//! Flag parsing shared by the three binaries.

use clap::Parser;
use ferrolb_runtime::cli::parse_args_from;
use ferrolb_runtime::{CommonArgs, DefaultPorts, LogFormat, NodeArgs};

#[derive(Debug, Parser)]
struct NodeBinary {
    #[command(flatten)]
    common: CommonArgs,
    #[command(flatten)]
    node: NodeArgs,
}

const PORTS: DefaultPorts = DefaultPorts {
    metrics: 7474,
    health: 7475,
};

#[test]
fn defaults_come_from_the_binary() {
    let args: NodeBinary = parse_args_from(PORTS, ["speaker", "--node-name", "node-1"]).unwrap();
    assert_eq!(args.common.metrics_addr.port(), 7474);
    assert_eq!(args.common.health_addr.port(), 7475);
    assert_eq!(args.common.log_format, LogFormat::Text);
    assert_eq!(args.common.kubeconfig, None);
    assert_eq!(args.node.node_name, "node-1");
}

#[test]
fn flags_override_defaults() {
    let args: NodeBinary = parse_args_from(
        PORTS,
        [
            "speaker",
            "--node-name=n",
            "--log-format=json",
            "--metrics-addr=127.0.0.1:9000",
            "--health-addr=127.0.0.1:9001",
            "--kubeconfig=/tmp/kc",
        ],
    )
    .unwrap();
    assert_eq!(args.common.log_format, LogFormat::Json);
    assert_eq!(args.common.metrics_addr.to_string(), "127.0.0.1:9000");
    assert_eq!(
        args.common.kubeconfig.as_deref(),
        Some(std::path::Path::new("/tmp/kc"))
    );
}

#[test]
fn bad_values_are_refused_with_the_flag_name() {
    let err = parse_args_from::<NodeBinary, _, _>(
        PORTS,
        ["speaker", "--node-name=n", "--log-format=xml"],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--log-format"), "{err}");
    let err = parse_args_from::<NodeBinary, _, _>(
        PORTS,
        ["speaker", "--node-name=n", "--metrics-addr=nowhere"],
    )
    .unwrap_err()
    .to_string();
    assert!(err.contains("--metrics-addr"), "{err}");
}
