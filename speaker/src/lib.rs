//! The speaker's pure cores and kernel glue: packet codecs, the election
//! of the node that announces each IP, and the watch on local links and
//! addresses. `main.rs` wires them to the Kubernetes API.

pub mod election;
pub mod links;
pub mod packet;
