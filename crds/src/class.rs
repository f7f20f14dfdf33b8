//! Which LoadBalancer Services belong to this FerroLB installation.

use k8s_openapi::api::core::v1::Service;

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
