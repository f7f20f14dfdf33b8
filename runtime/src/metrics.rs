//! The Prometheus registry every binary starts from.

use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::registry::Registry;

#[derive(Debug, Clone, Hash, PartialEq, Eq, EncodeLabelSet)]
struct BuildLabels {
    component: String,
    version: String,
}

/// A registry with the `ferrolb_` prefix and `ferrolb_build_info` in it.
pub fn registry(component: &str) -> Registry {
    let mut registry = Registry::with_prefix("ferrolb");
    let build = Family::<BuildLabels, Gauge>::default();
    build
        .get_or_create(&BuildLabels {
            component: component.to_string(),
            version: env!("CARGO_PKG_VERSION").to_string(),
        })
        .set(1);
    registry.register("build_info", "Component and version of this binary", build);
    registry
}

/// The registries in Prometheus text format, one exposition.
pub fn encode(registries: &[&Registry]) -> String {
    use prometheus_client::encoding::text::{encode_eof, encode_registry};
    let mut out = String::new();
    // Writing into a String cannot fail.
    for r in registries {
        let _ = encode_registry(&mut out, r);
    }
    let _ = encode_eof(&mut out);
    out
}
