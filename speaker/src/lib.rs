//! The speaker's pure cores and kernel glue: packet codecs, the election
//! of the node that announces each IP, and the watch on local links and
//! addresses. `main.rs` wires them to the Kubernetes API.

pub mod announce;
pub mod election;
pub mod fence;
pub mod heartbeat;
pub mod links;
pub mod liveness;
pub mod membership;
pub mod metrics;
pub mod packet;
pub mod peers;
pub mod probe;
pub mod report;
pub mod roster;
pub mod run;
pub mod view;
