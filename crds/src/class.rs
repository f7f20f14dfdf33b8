//! Which LoadBalancer Services belong to this FerroLB installation, and
//! how every component names a Service.

use k8s_openapi::api::core::v1::Service;

/// `namespace/name` of a Service.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    pub namespace: String,
    pub name: String,
}

impl ServiceKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }

    /// The key of `svc` (empty strings where its metadata lacks them).
    pub fn of(svc: &Service) -> Self {
        Self::new(
            svc.metadata.namespace.clone().unwrap_or_default(),
            svc.metadata.name.clone().unwrap_or_default(),
        )
    }
}

impl std::fmt::Display for ServiceKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// Which Services FerroLB serves: the controller assigns their IPs and the
/// speakers announce them (API.md: no class, or ours).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClassFilter {
    /// `spec.loadBalancerClass` that is ours.
    pub class: String,
    /// Whether Services without a class are ours too.
    pub classless: bool,
}

impl ClassFilter {
    /// True for `type: LoadBalancer` Services of our class.
    pub fn is_ours(&self, svc: &Service) -> bool {
        let Some(spec) = &svc.spec else { return false };
        if spec.type_.as_deref() != Some("LoadBalancer") {
            return false;
        }
        match spec.load_balancer_class.as_deref() {
            None => self.classless,
            Some(class) => class == self.class,
        }
    }
}
