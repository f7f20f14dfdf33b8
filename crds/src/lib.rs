//! FerroLB's API: the `ferrolb.io/v1beta1` custom resources, the annotations
//! FerroLB reads and writes, and the parser that turns a pool's
//! `spec.addresses` into typed ranges.
//!
//! The Rust types are the source of truth: the CRD manifests in
//! `crds/manifests/` and `charts/ferrolb/crds/` are generated from them by
//! `ferrolb-crdgen` (see [`manifests`]).

pub mod addresses;
pub mod annotations;
pub mod class;
pub mod l2advertisement;
pub mod manifests;
pub mod pool;
mod schema;
pub mod selector;

pub use addresses::{AddressError, IpRange, parse_addresses};
pub use l2advertisement::{L2Advertisement, L2AdvertisementSpec, L2AdvertisementStatus};
pub use pool::{IPAddressPool, IPAddressPoolSpec, IPAddressPoolStatus, ServiceAllocation};
pub use selector::{Labels, Selector, SelectorError};

/// API group of every FerroLB kind.
pub const GROUP: &str = "ferrolb.io";
/// API version of every FerroLB kind.
pub const VERSION: &str = "v1beta1";
