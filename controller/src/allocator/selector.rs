//! Label selectors as plain data, so pool eligibility is decided without kube
//! types. They live in `ferrolb-crds` so the speaker uses the same
//! implementation; `convert` builds them from `metav1.LabelSelector`.

pub use ferrolb_crds::selector::{Labels, Operator, Requirement, Selector};
