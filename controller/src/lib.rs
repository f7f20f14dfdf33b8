//! The FerroLB controller: assigns LoadBalancer IPs from IPAddressPools.
//!
//! [`allocator`] is the pure core (no kube types, no I/O).

pub mod allocator;
pub mod convert;
pub mod election;
pub mod metrics;
pub mod plan;
pub mod run;
pub mod write;
