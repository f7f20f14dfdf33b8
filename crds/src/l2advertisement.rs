//! `L2Advertisement`: which pools are announced with ARP/NDP, from which
//! nodes and on which interfaces. Field names and meanings are MetalLB's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::schema;

/// Announce the addresses of some pools at layer 2 (ARP for IPv4, NDP for
/// IPv6) from some nodes.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "L2Advertisement",
    plural = "l2advertisements",
    shortname = "l2adv",
    category = "ferrolb",
    status = "L2AdvertisementStatus",
    doc = "Announces the IPs of some pools with ARP (IPv4) and NDP (IPv6) from some nodes.",
    printcolumn = r#"{"name":"Pools","type":"string","jsonPath":".spec.ipAddressPools"}"#,
    printcolumn = r#"{"name":"Interfaces","type":"string","jsonPath":".spec.interfaces"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementSpec {
    /// Names of the pools announced. With ipAddressPoolSelectors also empty,
    /// every pool is announced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "pool_names")]
    pub ip_address_pools: Vec<String>,

    /// Selectors on pool labels; pools matching any of them are announced.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "pool_selectors")]
    pub ip_address_pool_selectors: Vec<LabelSelector>,

    /// Selectors on node labels; only matching nodes announce. Empty means
    /// every node.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "node_selectors")]
    pub node_selectors: Vec<LabelSelector>,

    /// Interfaces to answer on. Empty means the interfaces on which the IP
    /// is on-link (a local address whose prefix contains it), else the
    /// interface holding the node's InternalIP; never every interface.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "interface_names")]
    pub interfaces: Vec<String>,

    /// Selectors on Service labels; only matching Services are announced.
    /// Empty means every Service.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "service_selectors")]
    pub service_selectors: Vec<LabelSelector>,
}

fn pool_names(_: &mut SchemaGenerator) -> Schema {
    schema::name_list(
        "Names of the pools announced. With ipAddressPoolSelectors also empty, every pool is announced.",
        253,
    )
}

fn pool_selectors(_: &mut SchemaGenerator) -> Schema {
    schema::selector_list("Selectors on pool labels; pools matching any of them are announced.")
}

fn node_selectors(_: &mut SchemaGenerator) -> Schema {
    schema::selector_list(
        "Selectors on node labels; only matching nodes announce. Empty means every node.",
    )
}

fn service_selectors(_: &mut SchemaGenerator) -> Schema {
    schema::selector_list(
        "Selectors on Service labels; only matching Services are announced. Empty means every Service.",
    )
}

fn interface_names(_: &mut SchemaGenerator) -> Schema {
    let mut s = schema::name_list(
        "Interfaces to answer on. Empty means every eligible interface: up, broadcast-capable, ARP-capable, and not a bridge port, veth, CNI or tunnel device.",
        15,
    );
    // Linux interface names: 1-15 bytes, no '/', ':' or whitespace.
    s.insert(
        "items".into(),
        serde_json::json!({
            "type": "string", "minLength": 1, "maxLength": 15,
            "pattern": r"^[^/:\s]+$",
        }),
    );
    s
}

/// What the speakers last reported about this advertisement.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct L2AdvertisementStatus {
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
