//! Why an allocation was refused, in words a Service owner can act on.

use std::net::IpAddr;

use super::request::{Family, Port, ServiceKey};

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AllocError {
    #[error("no IPAddressPool exists")]
    NoPools,
    #[error("no IPAddressPool with autoAssign serves this Service: {0}")]
    NoEligiblePool(String),
    #[error("IPAddressPool {0:?} does not exist")]
    UnknownPool(String),
    #[error("IPAddressPool {pool:?} does not serve this Service: {why}")]
    PoolNotEligible { pool: String, why: String },
    #[error("IPAddressPool {pool:?} has no {family} addresses")]
    PoolLacksFamily { pool: String, family: Family },
    #[error("no free {families} address in {pools}")]
    Exhausted { families: String, pools: String },
    #[error("{ip} is not in any IPAddressPool")]
    NotInAnyPool { ip: IpAddr },
    #[error("{ips} are not in one IPAddressPool; a Service takes all its addresses from one pool")]
    SplitPools { ips: String },
    #[error("{ip} is not in IPAddressPool {pool:?}")]
    NotInPool { ip: IpAddr, pool: String },
    #[error("{ip} is in use by {owner}: {why}")]
    InUse {
        ip: IpAddr,
        owner: ServiceKey,
        why: SharingConflict,
    },
    #[error("invalid request: {0}")]
    InvalidRequest(String),
}

impl AllocError {
    /// Short, stable label for metrics and the Service condition's reason.
    pub fn reason(&self) -> &'static str {
        match self {
            Self::NoPools => "NoPools",
            Self::NoEligiblePool(_) => "NoEligiblePool",
            Self::UnknownPool(_) => "UnknownPool",
            Self::PoolNotEligible { .. } => "PoolNotEligible",
            Self::PoolLacksFamily { .. } => "PoolLacksFamily",
            Self::Exhausted { .. } => "PoolExhausted",
            Self::NotInAnyPool { .. } => "NotInAnyPool",
            Self::NotInPool { .. } => "NotInPool",
            Self::SplitPools { .. } => "NotInOnePool",
            Self::InUse { .. } => "IPInUse",
            Self::InvalidRequest(_) => "InvalidRequest",
        }
    }
}

/// Why a Service may not share an IP with the Service already on it.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SharingConflict {
    #[error("it does not allow sharing")]
    OwnerDoesNotShare,
    #[error("this Service has no allow-shared-ip annotation")]
    RequesterDoesNotShare,
    #[error("its sharing key is {owner:?}, not {requester:?}")]
    DifferentKey { owner: String, requester: String },
    #[error("both use port {0}")]
    PortClash(Port),
    #[error(
        "externalTrafficPolicy Local needs the same pod selector on every Service sharing an IP"
    )]
    DifferentBackend,
}
