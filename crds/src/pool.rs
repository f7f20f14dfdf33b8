//! `IPAddressPool`: a cluster-wide set of addresses LoadBalancer Services get
//! their IPs from. Field names and meanings are MetalLB's.

use k8s_openapi::apimachinery::pkg::apis::meta::v1::{Condition, LabelSelector};
use kube::CustomResource;
use schemars::{JsonSchema, Schema, SchemaGenerator};
use serde::{Deserialize, Serialize};

use crate::schema;

/// Addresses FerroLB may assign to LoadBalancer Services, and which Services
/// may get them.
#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, PartialEq, JsonSchema)]
#[kube(
    group = "ferrolb.io",
    version = "v1beta1",
    kind = "IPAddressPool",
    plural = "ipaddresspools",
    shortname = "ippool",
    shortname = "ippools",
    category = "ferrolb",
    status = "IPAddressPoolStatus",
    doc = "A pool of IP addresses that FerroLB assigns to LoadBalancer Services.",
    printcolumn = r#"{"name":"Addresses","type":"string","jsonPath":".spec.addresses"}"#,
    printcolumn = r#"{"name":"Auto","type":"boolean","jsonPath":".spec.autoAssign"}"#,
    printcolumn = r#"{"name":"Assigned","type":"integer","jsonPath":".status.assigned"}"#,
    printcolumn = r#"{"name":"Available","type":"integer","jsonPath":".status.available"}"#,
    printcolumn = r#"{"name":"Ready","type":"string","jsonPath":".status.conditions[?(@.type==\"Ready\")].status"}"#,
    printcolumn = r#"{"name":"Age","type":"date","jsonPath":".metadata.creationTimestamp"}"#
)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolSpec {
    #[schemars(schema_with = "schema::address_list")]
    pub addresses: Vec<String>,

    /// Whether Services that do not ask for this pool (or one of its IPs) may
    /// get addresses from it. Defaults to true.
    #[serde(default = "default_true")]
    pub auto_assign: bool,

    /// Never hand out addresses ending in .0 or .255, which some old client
    /// stacks treat as network or broadcast addresses. Defaults to false.
    #[serde(default, rename = "avoidBuggyIPs")]
    pub avoid_buggy_ips: bool,

    /// Restricts which Services may get addresses from this pool, and in
    /// which order pools are tried. Without it the pool serves every Service
    /// and is tried after pools that set a priority.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub service_allocation: Option<ServiceAllocation>,
}

fn default_true() -> bool {
    true
}

/// Which Services a pool serves (MetalLB's `serviceAllocation`).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct ServiceAllocation {
    /// Pools with a lower number are tried first among those a Service may
    /// use. Equal priorities are ordered by pool name, so the choice never
    /// depends on timing.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub priority: Option<i32>,

    /// Namespaces whose Services may use this pool. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "namespace_names")]
    pub namespaces: Vec<String>,

    /// Selectors on the Service's namespace labels; a namespace matching any
    /// of them may use this pool. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "namespace_selectors")]
    pub namespace_selectors: Vec<LabelSelector>,

    /// Selectors on the Service's labels; a Service matching any of them may
    /// use this pool. Empty means any.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    #[schemars(schema_with = "service_selectors")]
    pub service_selectors: Vec<LabelSelector>,
}

fn namespace_names(_: &mut SchemaGenerator) -> Schema {
    let mut s = schema::name_list(
        "Namespaces whose Services may use this pool. Empty means any.",
        63,
    );
    // Namespace names are DNS-1123 labels: no dots.
    s.insert(
        "items".into(),
        serde_json::json!({
            "type": "string", "minLength": 1, "maxLength": 63,
            "pattern": "^[a-z0-9]([-a-z0-9]*[a-z0-9])?$",
        }),
    );
    s
}

fn namespace_selectors(_: &mut SchemaGenerator) -> Schema {
    schema::selector_list(
        "Selectors on the Service's namespace labels; a namespace matching any of them may use this pool. Empty means any.",
    )
}

fn service_selectors(_: &mut SchemaGenerator) -> Schema {
    schema::selector_list(
        "Selectors on the Service's labels; a Service matching any of them may use this pool. Empty means any.",
    )
}

/// What the controller last observed about the pool.
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq, JsonSchema)]
#[serde(rename_all = "camelCase")]
pub struct IPAddressPoolStatus {
    /// IPv4 addresses currently assigned to Services.
    #[serde(default, rename = "assignedIPv4")]
    pub assigned_ipv4: i64,
    /// IPv6 addresses currently assigned to Services.
    #[serde(default, rename = "assignedIPv6")]
    pub assigned_ipv6: i64,
    /// IPv4 addresses still free.
    #[serde(default, rename = "availableIPv4")]
    pub available_ipv4: i64,
    /// IPv6 addresses still free; saturates at 9223372036854775807 for very
    /// large pools such as a /64.
    #[serde(default, rename = "availableIPv6")]
    pub available_ipv6: i64,
    /// All families: assigned addresses.
    #[serde(default)]
    pub assigned: i64,
    /// All families: free addresses (saturating).
    #[serde(default)]
    pub available: i64,
    /// `Ready`, and `Overlaps` / `Invalid` when the pool has a problem; their
    /// message names the other pool or the bad entry.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}
