//! A ruleset as a plain value: one table of ours per address family, its
//! sets and maps with their elements, its chains with their rules. The
//! renderer produces it, the diff compares two of them, the netlink layer
//! encodes it, and [`Ruleset::to_nft`] prints it in `nft` syntax (for
//! snapshots, `--print-ruleset` and `nft -c`).
//!
//! Only the statements the proxy needs exist here; each is written so that
//! its bytecode needs no anonymous set (per-rule anonymous sets are what
//! make large kube-proxy transactions slow in the kernel).

use std::collections::BTreeMap;
use std::fmt::{self, Write as _};
use std::net::IpAddr;

use ipnet::IpNet;

/// The address family of one table.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Family {
    V4,
    V6,
}

impl Family {
    pub fn of(ip: &IpAddr) -> Self {
        if ip.is_ipv4() { Self::V4 } else { Self::V6 }
    }

    /// nft's keyword for the table family and address payloads.
    pub fn nft(self) -> &'static str {
        match self {
            Self::V4 => "ip",
            Self::V6 => "ip6",
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::V4 => "IPv4",
            Self::V6 => "IPv6",
        }
    }
}

impl fmt::Display for Family {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A transport protocol a Service port may use.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Proto {
    Tcp,
    Udp,
    Sctp,
}

impl Proto {
    pub fn number(self) -> u8 {
        match self {
            Self::Tcp => 6,
            Self::Udp => 17,
            Self::Sctp => 132,
        }
    }

    pub fn parse(s: &str) -> Option<Self> {
        match s {
            "TCP" => Some(Self::Tcp),
            "UDP" => Some(Self::Udp),
            "SCTP" => Some(Self::Sctp),
            _ => None,
        }
    }

    pub fn nft(self) -> &'static str {
        match self {
            Self::Tcp => "tcp",
            Self::Udp => "udp",
            Self::Sctp => "sctp",
        }
    }
}

/// One field of a set key or map value.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Field {
    Addr,
    Proto,
    Port,
    /// A `numgen` result (host-order 32-bit integer).
    Slot,
}

/// One value of a field; `Prefix` only in interval sets.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Value {
    Addr(IpAddr),
    Prefix(IpNet),
    Proto(Proto),
    Port(u16),
    Slot(u32),
}

/// What a verdict map maps to.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Verdict {
    Goto(String),
    Drop,
}

/// The data side of a map element.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Data {
    Verdict(Verdict),
    Values(Vec<Value>),
}

/// What a map's elements map to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum SetData {
    Verdict,
    Fields(Vec<Field>),
}

/// A named set or map.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Set {
    pub key: Vec<Field>,
    pub data: Option<SetData>,
    /// Elements are prefixes (in the last key field).
    pub interval: bool,
    /// Filled by the data path (`update @set`), with this element timeout.
    pub dynamic_timeout: Option<u32>,
    /// The most elements the kernel will hold (`size`). Given, the kernel
    /// makes a hash table of that size once; without it, a hash that
    /// starts tiny and rehashes on every doubling while a large batch goes
    /// in (a quarter of a 10k-Service build's kernel time). A cap, not a
    /// hint: an add past it fails, so [`crate::programmed`] chooses it.
    pub capacity: Option<u32>,
    /// Key -> data (`None` for plain sets). Empty for dynamic sets: the
    /// kernel owns their elements.
    pub elements: BTreeMap<Vec<Value>, Option<Data>>,
}

impl Set {
    pub fn plain(key: Vec<Field>) -> Self {
        Self {
            key,
            data: None,
            interval: false,
            dynamic_timeout: None,
            capacity: None,
            elements: BTreeMap::new(),
        }
    }

    pub fn intervals(key: Vec<Field>) -> Self {
        Self {
            interval: true,
            ..Self::plain(key)
        }
    }

    pub fn map(key: Vec<Field>, data: SetData) -> Self {
        Self {
            data: Some(data),
            ..Self::plain(key)
        }
    }

    pub fn dynamic(key: Vec<Field>, timeout: u32) -> Self {
        Self {
            dynamic_timeout: Some(timeout),
            ..Self::plain(key)
        }
    }

    /// True when `other` has the same definition (elements aside).
    pub fn same_shape(&self, other: &Set) -> bool {
        self.key == other.key
            && self.data == other.data
            && self.interval == other.interval
            && self.dynamic_timeout == other.dynamic_timeout
            && self.capacity == other.capacity
    }

    /// A hash set whose elements we write (not intervals, not filled by the
    /// data path): the kind that takes a [`Set::capacity`].
    pub fn sizable(&self) -> bool {
        !self.interval && self.dynamic_timeout.is_none()
    }
}

/// A packet field a rule reads.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Expr {
    Saddr,
    Daddr,
    L4Proto,
    Dport,
    /// `numgen random mod N`.
    Random(u32),
}

/// Where a base chain hooks in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Hook {
    Prerouting,
    Input,
    Forward,
    Output,
    Postrouting,
}

impl Hook {
    fn nft(self) -> &'static str {
        match self {
            Self::Prerouting => "prerouting",
            Self::Input => "input",
            Self::Forward => "forward",
            Self::Output => "output",
            Self::Postrouting => "postrouting",
        }
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ChainType {
    Filter,
    Nat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Base {
    pub kind: ChainType,
    pub hook: Hook,
    pub priority: i32,
}

/// One statement of a rule, in order; matches first, then one action.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Stmt {
    /// `<fields> @set` (or `!= @set`).
    InSet {
        keys: Vec<Expr>,
        set: String,
        negate: bool,
    },
    /// `ct state new`.
    CtNew,
    /// `ct status dnat`.
    CtDnat,
    /// `fib saddr|daddr type local`.
    FibLocal {
        saddr: bool,
    },
    /// `meta l4proto <proto>`.
    L4Proto(Proto),
    /// `numgen random mod N == K`.
    RandomIs {
        modulus: u32,
        value: u32,
    },
    /// `meta mark & bit == bit`.
    MarkHas(u32),
    /// `meta mark set meta mark | bit`.
    MarkSet(u32),
    /// `meta mark set meta mark ^ bit` (clears a bit known to be set).
    MarkClear(u32),
    /// `update @set { ip saddr }`.
    UpdateSaddr {
        set: String,
    },
    /// `<fields> vmap @map`.
    Vmap {
        keys: Vec<Expr>,
        map: String,
    },
    /// `dnat ip to <fields> map @map` (the map yields address . port).
    DnatMap {
        keys: Vec<Expr>,
        map: String,
    },
    /// `dnat ip to addr:port`.
    Dnat {
        addr: IpAddr,
        port: u16,
    },
    MasqueradeFullyRandom,
    Reject,
    Drop,
    Jump(String),
    Goto(String),
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rule(pub Vec<Stmt>);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Chain {
    pub base: Option<Base>,
    pub rules: Vec<Rule>,
}

/// Our whole table for one family.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Ruleset {
    pub family: Family,
    pub table: String,
    pub sets: BTreeMap<String, Set>,
    pub chains: BTreeMap<String, Chain>,
}

impl Ruleset {
    pub fn new(family: Family, table: &str) -> Self {
        Self {
            family,
            table: table.to_string(),
            sets: BTreeMap::new(),
            chains: BTreeMap::new(),
        }
    }

    /// Number of elements over all sets and maps.
    pub fn element_count(&self) -> usize {
        self.sets.values().map(|s| s.elements.len()).sum()
    }

    /// The table in `nft -f` syntax. Deterministic, so it can be
    /// snapshot-tested; `nft -c -f` accepts it.
    pub fn to_nft(&self) -> String {
        let mut out = String::new();
        let f = self.family;
        let _ = writeln!(out, "table {} {} {{", f.nft(), self.table);
        for (name, set) in &self.sets {
            let kind = if set.data.is_some() { "map" } else { "set" };
            let _ = writeln!(out, "\t{kind} {name} {{");
            let _ = writeln!(out, "\t\t{}", set_type(f, set));
            let mut flags = Vec::new();
            if set.interval {
                flags.push("interval");
            }
            if set.dynamic_timeout.is_some() {
                flags.extend(["dynamic", "timeout"]);
            }
            if !flags.is_empty() {
                let _ = writeln!(out, "\t\tflags {}", flags.join(","));
            }
            if let Some(t) = set.dynamic_timeout {
                let _ = writeln!(out, "\t\ttimeout {t}s");
            }
            if let Some(c) = set.capacity {
                let _ = writeln!(out, "\t\tsize {c}");
            }
            if !set.elements.is_empty() {
                let elems: Vec<String> = set
                    .elements
                    .iter()
                    .map(|(k, d)| element_text(k, d.as_ref()))
                    .collect();
                let _ = writeln!(out, "\t\telements = {{ {} }}", elems.join(",\n\t\t\t     "));
            }
            let _ = writeln!(out, "\t}}");
        }
        for (name, chain) in &self.chains {
            let _ = writeln!(out, "\tchain {name} {{");
            if let Some(b) = &chain.base {
                let kind = match b.kind {
                    ChainType::Filter => "filter",
                    ChainType::Nat => "nat",
                };
                let _ = writeln!(
                    out,
                    "\t\ttype {kind} hook {} priority {}; policy accept;",
                    b.hook.nft(),
                    b.priority
                );
            }
            for rule in &chain.rules {
                let _ = writeln!(out, "\t\t{}", rule_text(f, rule));
            }
            let _ = writeln!(out, "\t}}");
        }
        out.push_str("}\n");
        out
    }
}

impl Ruleset {
    /// An `nft` command adding `elements` to set `set` of this table.
    pub fn add_elements_nft(&self, set: &str, elements: &[(Vec<Value>, Option<Data>)]) -> String {
        let items: Vec<String> = elements
            .iter()
            .map(|(k, d)| element_text(k, d.as_ref()))
            .collect();
        format!(
            "add element {} {} {set} {{ {} }}\n",
            self.family.nft(),
            self.table,
            items.join(", ")
        )
    }
}

impl fmt::Display for Ruleset {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.to_nft())
    }
}

fn field_type(f: Family, field: Field) -> &'static str {
    match (field, f) {
        (Field::Addr, Family::V4) => "ipv4_addr",
        (Field::Addr, Family::V6) => "ipv6_addr",
        (Field::Proto, _) => "inet_proto",
        (Field::Port, _) => "inet_service",
        (Field::Slot, _) => "mark",
    }
}

/// `typeof` form for maps keyed by a slot: nft types `numgen` as a plain
/// integer, which it cannot concatenate by `type`.
fn field_typeof(f: Family, field: Field, saddr: bool) -> String {
    let fam = f.nft();
    match field {
        Field::Addr if saddr => format!("{fam} saddr"),
        Field::Addr => format!("{fam} daddr"),
        Field::Proto => "meta l4proto".into(),
        Field::Port => "th dport".into(),
        Field::Slot => "numgen random mod 1".into(),
    }
}

fn set_type(f: Family, set: &Set) -> String {
    let uses_typeof = set.key.contains(&Field::Slot);
    if uses_typeof {
        let key: Vec<String> = set.key.iter().map(|k| field_typeof(f, *k, false)).collect();
        let mut text = format!("typeof {}", key.join(" . "));
        if let Some(SetData::Fields(data)) = &set.data {
            let data: Vec<String> = data.iter().map(|d| field_typeof(f, *d, false)).collect();
            text.push_str(&format!(" : {}", data.join(" . ")));
        }
        return text;
    }
    let key: Vec<&str> = set.key.iter().map(|k| field_type(f, *k)).collect();
    let mut text = format!("type {}", key.join(" . "));
    match &set.data {
        Some(SetData::Verdict) => text.push_str(" : verdict"),
        Some(SetData::Fields(data)) => {
            let data: Vec<&str> = data.iter().map(|d| field_type(f, *d)).collect();
            text.push_str(&format!(" : {}", data.join(" . ")));
        }
        None => {}
    }
    text
}

fn value_text(v: &Value) -> String {
    match v {
        Value::Addr(a) => a.to_string(),
        Value::Prefix(p) => p.trunc().to_string(),
        Value::Proto(p) => p.nft().to_string(),
        Value::Port(p) => p.to_string(),
        Value::Slot(s) => format!("0x{s:08x}"),
    }
}

fn element_text(key: &[Value], data: Option<&Data>) -> String {
    let key: Vec<String> = key.iter().map(value_text).collect();
    let mut text = key.join(" . ");
    match data {
        Some(Data::Verdict(Verdict::Goto(c))) => text.push_str(&format!(" : goto {c}")),
        Some(Data::Verdict(Verdict::Drop)) => text.push_str(" : drop"),
        Some(Data::Values(vs)) => {
            let vs: Vec<String> = vs.iter().map(value_text).collect();
            text.push_str(&format!(" : {}", vs.join(" . ")));
        }
        None => {}
    }
    text
}

fn expr_text(f: Family, e: Expr) -> String {
    match e {
        Expr::Saddr => format!("{} saddr", f.nft()),
        Expr::Daddr => format!("{} daddr", f.nft()),
        Expr::L4Proto => "meta l4proto".into(),
        Expr::Dport => "th dport".into(),
        Expr::Random(n) => format!("numgen random mod {n}"),
    }
}

fn keys_text(f: Family, keys: &[Expr]) -> String {
    keys.iter()
        .map(|k| expr_text(f, *k))
        .collect::<Vec<_>>()
        .join(" . ")
}

fn rule_text(f: Family, rule: &Rule) -> String {
    let parts: Vec<String> = rule
        .0
        .iter()
        .map(|s| match s {
            Stmt::InSet { keys, set, negate } => {
                let op = if *negate { "!= " } else { "" };
                format!("{} {op}@{set}", keys_text(f, keys))
            }
            Stmt::CtNew => "ct state new".into(),
            Stmt::CtDnat => "ct status dnat".into(),
            Stmt::FibLocal { saddr } => {
                format!("fib {} type local", if *saddr { "saddr" } else { "daddr" })
            }
            Stmt::L4Proto(p) => format!("meta l4proto {}", p.nft()),
            Stmt::RandomIs { modulus, value } => {
                format!("numgen random mod {modulus} == {value}")
            }
            Stmt::MarkHas(bit) => format!("meta mark & 0x{bit:08x} != 0"),
            Stmt::MarkSet(bit) => format!("meta mark set meta mark | 0x{bit:08x}"),
            Stmt::MarkClear(bit) => format!("meta mark set meta mark ^ 0x{bit:08x}"),
            Stmt::UpdateSaddr { set } => format!("update @{set} {{ {} saddr }}", f.nft()),
            Stmt::Vmap { keys, map } => format!("{} vmap @{map}", keys_text(f, keys)),
            Stmt::DnatMap { keys, map } => {
                format!("dnat {} to {} map @{map}", f.nft(), keys_text(f, keys))
            }
            Stmt::Dnat { addr, port } => match addr {
                IpAddr::V4(a) => format!("dnat ip to {a}:{port}"),
                IpAddr::V6(a) => format!("dnat ip6 to [{a}]:{port}"),
            },
            Stmt::MasqueradeFullyRandom => "masquerade fully-random".into(),
            Stmt::Reject => "reject".into(),
            Stmt::Drop => "drop".into(),
            Stmt::Jump(c) => format!("jump {c}"),
            Stmt::Goto(c) => format!("goto {c}"),
        })
        .collect();
    parts.join(" ")
}
