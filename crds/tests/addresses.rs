//! Unit and property tests of the `spec.addresses` parser.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};

use ferrolb_crds::addresses::{AddressError, IpRange, parse_addresses};
use ipnet::IpNet;
use proptest::prelude::*;

fn r(s: &str) -> IpRange {
    s.parse().unwrap_or_else(|e| panic!("{s}: {e}"))
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

#[test]
fn cidr_covers_network_to_broadcast() {
    let p = r("198.18.8.0/24");
    assert_eq!(p.start(), ip("198.18.8.0"));
    assert_eq!(p.end(), ip("198.18.8.255"));
    assert_eq!(p.len(), 256);
    assert_eq!(p.to_string(), "198.18.8.0/24");
}

#[test]
fn cidr_host_bits_are_ignored_like_metallb() {
    assert_eq!(r("198.18.8.77/24"), r("198.18.8.0/24"));
}

#[test]
fn range_is_inclusive_and_tolerates_spaces() {
    let p = r("198.18.9.10 - 198.18.9.20");
    assert_eq!(p.len(), 11);
    assert!(p.contains(ip("198.18.9.10")));
    assert!(p.contains(ip("198.18.9.20")));
    assert!(!p.contains(ip("198.18.9.21")));
    assert_eq!(p.to_string(), "198.18.9.10-198.18.9.20");
}

#[test]
fn edges_zero_and_host_prefixes() {
    assert_eq!(r("0.0.0.0/0").len(), 1 << 32);
    assert_eq!(r("0.0.0.0/0").to_string(), "0.0.0.0/0");
    assert_eq!(r("::/0").len(), u128::MAX, "::/0 saturates");
    assert_eq!(r("::/0").to_string(), "::/0");
    assert_eq!(r("198.18.8.7/32").len(), 1);
    assert_eq!(r("198.18.8.7/32").to_string(), "198.18.8.7/32");
    assert_eq!(r("2001:db8::8:1/128").len(), 1);
    assert_eq!(r("198.18.8.7-198.18.8.7").to_string(), "198.18.8.7/32");
}

#[test]
fn a_whole_slash_eight_is_two_numbers() {
    let p = r("10.0.0.0/8");
    assert_eq!(p.len(), 1 << 24);
    assert_eq!(p.nth((1 << 24) - 1), Some(ip("10.255.255.255")));
    assert_eq!(p.nth(1 << 24), None);
    assert_eq!(
        std::mem::size_of::<IpRange>(),
        2 * std::mem::size_of::<IpAddr>()
    );
}

#[test]
fn ipv6_ranges_and_cidrs() {
    let p = r("2001:db8::8:0/112");
    assert_eq!(p.len(), 65536);
    assert_eq!(r("2001:db8::1-2001:db8::ff").len(), 255);
    assert_eq!(r("2001:db8::/64").len(), 1 << 64);
}

#[test]
fn refusals_say_why() {
    assert_eq!("".parse::<IpRange>(), Err(AddressError::Empty));
    assert_eq!("  ".parse::<IpRange>(), Err(AddressError::Empty));
    for bad in [
        "198.18.8.0/33",
        "198.18.8.0/",
        "not-an-ip",
        "198.18.8.1",
        "198.18.8.1-",
        "198.18.8.1-198.18.8.2-198.18.8.3",
        " 198.18.8.0/24",
        "198.18.8.256/24",
        "010.1.1.1/32",
        "198.18.8.0/024",
        "198.18.8.0/+24",
    ] {
        assert!(
            matches!(bad.parse::<IpRange>(), Err(AddressError::Malformed { .. })),
            "{bad:?} should be malformed, got {:?}",
            bad.parse::<IpRange>()
        );
    }
    assert!(matches!(
        "198.18.9.20-198.18.9.10".parse::<IpRange>(),
        Err(AddressError::Reversed { .. })
    ));
    assert!(matches!(
        "198.18.9.1-2001:db8::1".parse::<IpRange>(),
        Err(AddressError::MixedFamily { .. })
    ));
    assert!(matches!(
        "::ffff:198.18.9.1/128".parse::<IpRange>(),
        Err(AddressError::Ipv4Mapped { .. })
    ));
    let msg = "198.18.9.20-198.18.9.10"
        .parse::<IpRange>()
        .unwrap_err()
        .to_string();
    assert!(
        msg.contains("198.18.9.20-198.18.9.10") && msg.contains("before"),
        "{msg}"
    );
}

#[test]
fn pool_errors_name_the_index() {
    let err = parse_addresses(&["198.18.8.0/24", "2001:db8::8:0/112", "nope"]).unwrap_err();
    assert_eq!(err.index, 2);
    assert!(err.to_string().starts_with("spec.addresses[2]: "), "{err}");
    let ok = parse_addresses(&["198.18.8.0/24", "2001:db8::8:0/112"]).unwrap();
    assert_eq!(ok.len(), 2);
    assert!(ok[0].is_ipv4() && !ok[1].is_ipv4());
}

#[test]
fn overlap_examples() {
    assert!(r("198.18.8.0/24").overlaps(&r("198.18.8.255-198.18.9.3")));
    assert!(!r("198.18.8.0/24").overlaps(&r("198.18.9.0/24")));
    assert!(
        !r("0.0.0.0/0").overlaps(&r("::/0")),
        "families never overlap"
    );
}

fn any_v4_range() -> impl Strategy<Value = IpRange> {
    (any::<u32>(), any::<u32>()).prop_map(|(a, b)| {
        let (a, b) = (a.min(b), a.max(b));
        IpRange::new(Ipv4Addr::from(a).into(), Ipv4Addr::from(b).into()).unwrap()
    })
}

fn any_v6_range() -> impl Strategy<Value = IpRange> {
    (any::<u128>(), any::<u128>())
        .prop_filter("not v4-mapped", |(a, b)| {
            Ipv6Addr::from(*a).to_ipv4_mapped().is_none()
                && Ipv6Addr::from(*b).to_ipv4_mapped().is_none()
        })
        .prop_map(|(a, b)| {
            let (a, b) = (a.min(b), a.max(b));
            IpRange::new(Ipv6Addr::from(a).into(), Ipv6Addr::from(b).into()).unwrap()
        })
}

fn any_range() -> impl Strategy<Value = IpRange> {
    prop_oneof![any_v4_range(), any_v6_range()]
}

fn any_net() -> impl Strategy<Value = IpNet> {
    prop_oneof![
        (any::<u32>(), 0u8..=32)
            .prop_map(|(a, p)| IpNet::new(Ipv4Addr::from(a).into(), p).unwrap()),
        (any::<u128>(), 0u8..=128)
            .prop_filter("not v4-mapped", |(a, _)| Ipv6Addr::from(*a)
                .to_ipv4_mapped()
                .is_none())
            .prop_map(|(a, p)| IpNet::new(Ipv6Addr::from(a).into(), p).unwrap()),
    ]
}

proptest! {
    #[test]
    fn display_round_trips(range in any_range()) {
        let text = range.to_string();
        prop_assert_eq!(text.parse::<IpRange>(), Ok(range));
    }

    #[test]
    fn cidrs_parse_to_their_network(net in any_net()) {
        let range: IpRange = net.to_string().parse().unwrap();
        prop_assert_eq!(range.start(), net.network());
        prop_assert_eq!(range.end(), net.broadcast());
        prop_assert_eq!(range.as_net(), Some(net.trunc()));
        let host_bits = u32::from(net.max_prefix_len() - net.prefix_len());
        prop_assert_eq!(range.len(), 1u128.checked_shl(host_bits).unwrap_or(u128::MAX));
    }

    #[test]
    fn overlap_is_symmetric_and_matches_membership(a in any_range(), b in any_range()) {
        prop_assert_eq!(a.overlaps(&b), b.overlaps(&a));
        // Two ranges overlap exactly when one contains the other's start.
        prop_assert_eq!(a.overlaps(&b), a.contains(b.start()) || b.contains(a.start()));
        prop_assert!(a.overlaps(&a));
    }

    #[test]
    fn reversed_ranges_are_refused(a in any::<u32>(), b in any::<u32>()) {
        prop_assume!(a != b);
        let (lo, hi) = (Ipv4Addr::from(a.min(b)), Ipv4Addr::from(a.max(b)));
        let is_reversed = matches!(
            format!("{hi}-{lo}").parse::<IpRange>(),
            Err(AddressError::Reversed { .. })
        );
        prop_assert!(is_reversed);
    }

    #[test]
    fn mixed_families_are_refused(a in any::<u32>(), b in any::<u128>()) {
        let text = format!("{}-{}", Ipv4Addr::from(a), Ipv6Addr::from(b));
        let refused = text.parse::<IpRange>().is_err();
        prop_assert!(refused);
    }

    #[test]
    fn nth_stays_inside(range in any_range(), offset in any::<u128>()) {
        match range.nth(offset) {
            Some(ip) => prop_assert!(range.contains(ip)),
            None => prop_assert!(offset >= range.len()),
        }
    }
}
