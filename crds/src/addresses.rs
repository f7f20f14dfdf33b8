//! Parsing of `IPAddressPool.spec.addresses` into typed, inclusive ranges.
//!
//! Each entry is a CIDR (`198.18.8.0/24`, `2001:db8::8:0/112`) or an inclusive
//! range (`198.18.9.10-198.18.9.20`). The rules here are the same ones the CRD
//! schema enforces with CEL at `kubectl apply` time (see `schema.rs`), so an
//! object the API server accepted always parses; the parser still checks
//! everything because objects may predate a schema change.
//!
//! A range is two numbers, never a list of addresses, so a /8 or an IPv6 /64
//! costs the same as a /30.

use std::fmt;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::str::FromStr;

use ipnet::IpNet;

/// Why one `spec.addresses` entry was refused.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum AddressError {
    #[error("address entry is empty")]
    Empty,
    #[error(
        "{entry:?} is neither a CIDR (such as 198.18.8.0/24) nor an inclusive range (such as 198.18.9.10-198.18.9.20)"
    )]
    Malformed { entry: String },
    #[error("{entry:?}: IPv4-mapped IPv6 addresses are not accepted; write the IPv4 address")]
    Ipv4Mapped { entry: String },
    #[error("{entry:?}: a range must start and end in the same IP family")]
    MixedFamily { entry: String },
    #[error("{entry:?}: the range ends ({end}) before it starts ({start})")]
    Reversed {
        entry: String,
        start: IpAddr,
        end: IpAddr,
    },
}

/// The position of a refused entry inside `spec.addresses`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("spec.addresses[{index}]: {source}")]
pub struct PoolAddressError {
    pub index: usize,
    #[source]
    pub source: AddressError,
}

/// An inclusive range of addresses of one family, `start <= end`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct IpRange {
    start: IpAddr,
    end: IpAddr,
}

/// Parses every entry of a pool's `spec.addresses`, stopping at the first bad
/// one so the error can name it.
pub fn parse_addresses<S: AsRef<str>>(entries: &[S]) -> Result<Vec<IpRange>, PoolAddressError> {
    entries
        .iter()
        .enumerate()
        .map(|(index, e)| {
            e.as_ref()
                .parse()
                .map_err(|source| PoolAddressError { index, source })
        })
        .collect()
}

impl IpRange {
    /// A range from `start` to `end` inclusive.
    pub fn new(start: IpAddr, end: IpAddr) -> Result<Self, AddressError> {
        let entry = || format!("{start}-{end}");
        if start.is_ipv4() != end.is_ipv4() {
            return Err(AddressError::MixedFamily { entry: entry() });
        }
        if is_ipv4_mapped(start) || is_ipv4_mapped(end) {
            return Err(AddressError::Ipv4Mapped { entry: entry() });
        }
        if start > end {
            return Err(AddressError::Reversed {
                entry: entry(),
                start,
                end,
            });
        }
        Ok(Self { start, end })
    }

    /// Every address of `net`, host bits of its address ignored (as MetalLB does).
    pub fn from_net(net: IpNet) -> Self {
        Self {
            start: net.network(),
            end: net.broadcast(),
        }
    }

    pub fn start(&self) -> IpAddr {
        self.start
    }

    pub fn end(&self) -> IpAddr {
        self.end
    }

    pub fn is_ipv4(&self) -> bool {
        self.start.is_ipv4()
    }

    pub fn contains(&self, ip: IpAddr) -> bool {
        ip.is_ipv4() == self.is_ipv4() && self.start <= ip && ip <= self.end
    }

    /// True when the two ranges share at least one address.
    pub fn overlaps(&self, other: &IpRange) -> bool {
        self.is_ipv4() == other.is_ipv4() && self.start <= other.end && other.start <= self.end
    }

    /// Number of addresses in the range. `::/0` holds 2^128 addresses, one more
    /// than a `u128` can count, so it reports `u128::MAX`.
    pub fn len(&self) -> u128 {
        (to_u128(self.end) - to_u128(self.start)).saturating_add(1)
    }

    /// Never true: a range holds at least one address. Present for clippy's
    /// `len_without_is_empty`.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// The CIDR with exactly these addresses, if there is one.
    pub fn as_net(&self) -> Option<IpNet> {
        let bits: u8 = if self.is_ipv4() { 32 } else { 128 };
        let start = to_u128(self.start);
        let span = to_u128(self.end) - start; // number of addresses minus one
        let host_bits = if span == family_max(self.is_ipv4()) {
            bits
        } else if (span + 1).is_power_of_two() {
            (span + 1).trailing_zeros() as u8
        } else {
            return None;
        };
        let aligned = host_bits == 128 || start & ((1u128 << host_bits) - 1) == 0;
        if !aligned {
            return None;
        }
        IpNet::new(self.start, bits - host_bits).ok()
    }
}

fn family_max(v4: bool) -> u128 {
    if v4 { u128::from(u32::MAX) } else { u128::MAX }
}

/// The address as a number (IPv4 in the low 32 bits), for range arithmetic.
pub fn to_u128(ip: IpAddr) -> u128 {
    match ip {
        IpAddr::V4(a) => u128::from(u32::from(a)),
        IpAddr::V6(a) => u128::from(a),
    }
}

fn is_ipv4_mapped(ip: IpAddr) -> bool {
    matches!(ip, IpAddr::V6(a) if a.to_ipv4_mapped().is_some())
}

/// The address of family `v4` with numeric value `value`, if it fits.
pub fn from_u128(v4: bool, value: u128) -> Option<IpAddr> {
    if v4 {
        Some(IpAddr::V4(Ipv4Addr::from(u32::try_from(value).ok()?)))
    } else {
        Some(IpAddr::V6(Ipv6Addr::from(value)))
    }
}

impl IpRange {
    /// The address `offset` places after the start of the range, if it is inside.
    pub fn nth(&self, offset: u128) -> Option<IpAddr> {
        let value = to_u128(self.start).checked_add(offset)?;
        if value > to_u128(self.end) {
            return None;
        }
        from_u128(self.is_ipv4(), value)
    }

    /// Start and end as numbers.
    pub fn bounds(&self) -> (u128, u128) {
        (to_u128(self.start), to_u128(self.end))
    }
}

impl FromStr for IpRange {
    type Err = AddressError;

    fn from_str(entry: &str) -> Result<Self, Self::Err> {
        let malformed = || AddressError::Malformed {
            entry: entry.to_string(),
        };
        if entry.trim().is_empty() {
            return Err(AddressError::Empty);
        }
        if entry.contains('/') {
            // Like the schema's isCIDR(): no surrounding whitespace allowed.
            let net = parse_cidr(entry).ok_or_else(malformed)?;
            if is_ipv4_mapped(net.addr()) {
                return Err(AddressError::Ipv4Mapped {
                    entry: entry.to_string(),
                });
            }
            return Ok(Self::from_net(net));
        }
        let mut parts = entry.split('-');
        let (Some(a), Some(b), None) = (parts.next(), parts.next(), parts.next()) else {
            return Err(malformed());
        };
        let start: IpAddr = a.trim().parse().map_err(|_| malformed())?;
        let end: IpAddr = b.trim().parse().map_err(|_| malformed())?;
        Self::new(start, end).map_err(|e| match e {
            AddressError::MixedFamily { .. } => AddressError::MixedFamily {
                entry: entry.to_string(),
            },
            AddressError::Ipv4Mapped { .. } => AddressError::Ipv4Mapped {
                entry: entry.to_string(),
            },
            AddressError::Reversed { start, end, .. } => AddressError::Reversed {
                entry: entry.to_string(),
                start,
                end,
            },
            other => other,
        })
    }
}

/// Strict CIDR syntax, as Go's `netip.ParsePrefix` (and so the schema's
/// `isCIDR()`) reads it: no leading zeros in the address or the prefix length.
fn parse_cidr(text: &str) -> Option<IpNet> {
    let (addr, len) = text.split_once('/')?;
    let addr: IpAddr = addr.parse().ok()?;
    let canonical_len = !len.is_empty()
        && len.bytes().all(|b| b.is_ascii_digit())
        && (len == "0" || !len.starts_with('0'));
    if !canonical_len {
        return None;
    }
    IpNet::new(addr, len.parse().ok()?).ok()
}

impl fmt::Display for IpRange {
    /// The CIDR when the range is exactly one, `start-end` otherwise; the
    /// output always parses back to the same range.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.as_net() {
            Some(net) => write!(f, "{net}"),
            None => write!(f, "{}-{}", self.start, self.end),
        }
    }
}
