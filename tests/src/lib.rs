//! The FerroLB lab: a real Kubernetes control plane, with nodes, pods and an
//! outside client as Linux network namespaces (see shared/LAB.md).
//!
//! The `ferrolb-lab` binary is the user interface; [`lab::Lab`] drives that
//! binary from tests.

pub mod addresses;
pub mod bench;
pub mod certs;
pub mod commands;
pub mod components;
pub mod container;
pub mod control_plane;
pub mod demo;
pub mod echo;
pub mod kubeconfig;
pub mod kubectl;
pub mod kubelet;
pub mod l2probe;
pub mod lab;
pub mod names;
pub mod netns;
pub mod process;
pub mod state;
pub mod supervisor;
