//! Sends [`Op`]s to the kernel over netlink, one atomic transaction per
//! call, through the `nlink` crate. The `nft` binary is never run: forking
//! it and letting it cache the table is the cost this proxy avoids.
//!
//! The only module that knows nlink's types; the rest of the proxy speaks
//! [`crate::ruleset`].

use std::net::IpAddr;
use std::time::Duration;

use nlink::netlink::nftables::{
    BaseChain, Chain as NlChain, CmpOp, CtKey, Expr as NlExpr, Family as NlFamily, FibFlags,
    FibResult, FilterHook, LookupExpr, MetaKey, NatHook, NumgenKind, PayloadBase, Policy, Priority,
    RawExpr, Register, Rule as NlRule, Set as NlSet, SetDataType, SetElement, SetKeyType,
    Transaction, Verdict as NlVerdict,
};
use nlink::netlink::{Connection, Nftables};

use crate::diff::Op;
use crate::ruleset::{
    Base, ChainType, Data, Expr, Family, Field, Hook, Rule, Ruleset, Set, SetData, Stmt, Value,
    Verdict,
};

/// Elements per netlink message: one message's attributes are limited to
/// 64 KiB.
const ELEMENTS_PER_MESSAGE: usize = 512;
/// Socket send buffer: a whole transaction goes out in one `sendmsg`.
const SEND_BUFFER: usize = 256 << 20;

#[derive(Debug, thiserror::Error)]
pub enum NetlinkError {
    #[error("opening the nftables netlink socket: {0}")]
    Open(String),
    #[error("building the transaction: {0}")]
    Build(String),
    #[error("the kernel refused the transaction: {0}")]
    Commit(String),
}

/// A netlink connection to the nftables subsystem.
pub struct Nft {
    conn: Connection<Nftables>,
}

impl Nft {
    /// Opens a connection in this process's network namespace.
    pub fn open() -> Result<Self, NetlinkError> {
        let conn = Connection::<Nftables>::new().map_err(|e| NetlinkError::Open(e.to_string()))?;
        Ok(Self::tuned(conn))
    }

    /// Opens a connection in the network namespace at `path` (for example
    /// `/run/netns/NAME`), without entering it.
    pub fn open_in(path: &std::path::Path) -> Result<Self, NetlinkError> {
        let conn = Connection::<Nftables>::new_in(path)
            .map_err(|e| NetlinkError::Open(format!("{}: {e}", path.display())))?;
        Ok(Self::tuned(conn))
    }

    fn tuned(conn: Connection<Nftables>) -> Self {
        // Without room for the whole batch the kernel refuses it
        // (EMSGSIZE). SO_SNDBUFFORCE passes net.core.wmem_max (we run with
        // CAP_NET_ADMIN); SO_SNDBUF is the fallback.
        let fd = socket2::SockRef::from(conn.socket());
        let forced = nix::sys::socket::setsockopt(
            conn.socket(),
            nix::sys::socket::sockopt::SndBufForce,
            &SEND_BUFFER,
        );
        if forced.is_err() {
            let _ = fd.set_send_buffer_size(SEND_BUFFER);
        }
        Self { conn }
    }

    /// Commits `ops`, which lead to `target`, as one transaction: all of it
    /// takes effect, or none of it. `target` supplies the definitions of the
    /// sets the operations fill.
    pub async fn commit(&self, target: &Ruleset, ops: &[Op]) -> Result<(), NetlinkError> {
        append(self.conn.transaction(), target, ops)?
            .commit(&self.conn)
            .await
            .map_err(|e| NetlinkError::Commit(e.to_string()))
    }

    /// Like [`Nft::commit`], with the operations arriving in batches: each
    /// is written into the transaction and dropped, so only the
    /// transaction's bytes are held, never all the operations as values.
    pub async fn commit_batches(
        &self,
        target: &Ruleset,
        batches: impl Iterator<Item = Vec<Op>>,
    ) -> Result<(), NetlinkError> {
        let mut tx = self.conn.transaction();
        for batch in batches {
            tx = append(tx, target, &batch)?;
        }
        tx.commit(&self.conn)
            .await
            .map_err(|e| NetlinkError::Commit(e.to_string()))
    }

    /// Removes our table of `family`, if it exists (`--cleanup`).
    pub async fn remove_table(&self, family: Family, table: &str) -> Result<bool, NetlinkError> {
        self.conn
            .del_table_if_exists(table, nl_family(family))
            .await
            .map_err(|e| NetlinkError::Commit(e.to_string()))
    }
}

/// Writes `ops`, which lead to `target`, into `tx`. `target` supplies the
/// definitions of the sets the operations fill.
fn append(mut tx: Transaction, target: &Ruleset, ops: &[Op]) -> Result<Transaction, NetlinkError> {
    let (family, table) = (target.family, target.table.as_str());
    let fam = nl_family(family);
    let handle = |name: &str| match target.sets.get(name) {
        Some(set) => nl_set(family, table, name, set),
        None => NlSet::new(table, name).family(fam),
    };
    for op in ops {
        tx = match op {
            Op::ReplaceTable => tx.destroy_table(table, fam).add_table(table, fam),
            Op::AddSet { name, set } => tx.add_set(nl_set(family, table, name, set)),
            Op::AddChain { name, base } => {
                let mut chain = NlChain::new(table, name.as_str())
                    .map_err(|e| NetlinkError::Build(e.to_string()))?
                    .family(fam);
                if let Some(b) = base {
                    chain = chain.base(nl_base(b));
                }
                tx.add_chain(chain)
            }
            Op::FlushChain(name) => tx.flush_chain(table, name, fam),
            Op::AddRule { chain, rule } => {
                let mut r = NlRule::new(table, chain).family(fam);
                for e in encode_rule(family, rule)? {
                    r = r.expr(e);
                }
                tx.add_rule(r)
            }
            Op::AddElements { set, elements } => {
                let handle = handle(set);
                let mut encoded = Vec::with_capacity(elements.len());
                for (key, data) in elements {
                    encoded.push(element(key, data.as_ref())?);
                }
                for chunk in encoded.chunks(ELEMENTS_PER_MESSAGE) {
                    tx = tx.add_set_elements(&handle, chunk);
                }
                tx
            }
            Op::DeleteElements { set, keys } => {
                let handle = handle(set);
                let mut encoded = Vec::with_capacity(keys.len());
                for key in keys {
                    encoded.push(element(key, None)?);
                }
                for chunk in encoded.chunks(ELEMENTS_PER_MESSAGE) {
                    tx = tx.del_set_elements(&handle, chunk);
                }
                tx
            }
            Op::DeleteChain(name) => tx.del_chain(table, name, fam),
            Op::DeleteSet(name) => tx.del_set(table, name, fam),
        };
    }
    Ok(tx)
}

fn nl_family(f: Family) -> NlFamily {
    match f {
        Family::V4 => NlFamily::Ip,
        Family::V6 => NlFamily::Ip6,
    }
}

fn nl_base(b: &Base) -> BaseChain {
    let priority = Priority::Custom(b.priority);
    let base = match (b.kind, b.hook) {
        (ChainType::Nat, Hook::Prerouting) => BaseChain::nat(NatHook::Prerouting, priority),
        (ChainType::Nat, Hook::Input) => BaseChain::nat(NatHook::Input, priority),
        (ChainType::Nat, Hook::Output) => BaseChain::nat(NatHook::Output, priority),
        (ChainType::Nat, _) => BaseChain::nat(NatHook::Postrouting, priority),
        (ChainType::Filter, Hook::Prerouting) => {
            BaseChain::filter(FilterHook::Prerouting, priority)
        }
        (ChainType::Filter, Hook::Input) => BaseChain::filter(FilterHook::Input, priority),
        (ChainType::Filter, Hook::Forward) => BaseChain::filter(FilterHook::Forward, priority),
        (ChainType::Filter, Hook::Output) => BaseChain::filter(FilterHook::Output, priority),
        (ChainType::Filter, Hook::Postrouting) => {
            BaseChain::filter(FilterHook::Postrouting, priority)
        }
    };
    base.policy(Policy::Accept)
}

fn key_type(family: Family, field: Field) -> SetKeyType {
    match (field, family) {
        (Field::Addr, Family::V4) => SetKeyType::Ipv4Addr,
        (Field::Addr, Family::V6) => SetKeyType::Ipv6Addr,
        (Field::Proto, _) => SetKeyType::InetProto,
        (Field::Port, _) => SetKeyType::InetService,
        (Field::Slot, _) => SetKeyType::Mark,
    }
}

fn key_types(family: Family, fields: &[Field]) -> SetKeyType {
    match fields {
        [one] => key_type(family, *one),
        many => SetKeyType::Concat(many.iter().map(|f| key_type(family, *f)).collect()),
    }
}

fn nl_set(family: Family, table: &str, name: &str, set: &Set) -> NlSet {
    let mut s = NlSet::new(table, name)
        .family(nl_family(family))
        .key_type(key_types(family, &set.key));
    match &set.data {
        Some(SetData::Verdict) => s = s.vmap(),
        Some(SetData::Fields(fields)) => {
            s = s.map(SetDataType::Value(key_types(family, fields)));
        }
        None => {}
    }
    if set.interval {
        s = s.interval();
    }
    if let Some(t) = set.dynamic_timeout {
        s = s.dynamic().timeout(Duration::from_secs(u64::from(t)));
    }
    if let Some(c) = set.capacity {
        s = s.size(c);
    }
    s
}

fn value(v: &Value) -> Result<SetElement, NetlinkError> {
    Ok(match *v {
        Value::Addr(IpAddr::V4(a)) => SetElement::ipv4(a),
        Value::Addr(IpAddr::V6(a)) => SetElement::ipv6(a),
        Value::Prefix(p) => match p.trunc() {
            ipnet::IpNet::V4(n) => SetElement::ipv4_prefix(n.network(), n.prefix_len()),
            ipnet::IpNet::V6(n) => SetElement::ipv6_prefix(n.network(), n.prefix_len()),
        }
        .map_err(|e| NetlinkError::Build(e.to_string()))?,
        Value::Proto(p) => SetElement::inet_proto(p.number()),
        Value::Port(p) => SetElement::port(p),
        Value::Slot(s) => SetElement::mark(s),
    })
}

fn values(vs: &[Value]) -> Result<SetElement, NetlinkError> {
    match vs {
        [one] => value(one),
        many => Ok(SetElement::concat(
            many.iter().map(value).collect::<Result<Vec<_>, _>>()?,
        )),
    }
}

fn element(key: &[Value], data: Option<&Data>) -> Result<SetElement, NetlinkError> {
    let e = values(key)?;
    Ok(match data {
        None => e,
        Some(Data::Values(vs)) => e.value(values(vs)?),
        Some(Data::Verdict(v)) => e.verdict(nl_verdict(v)?),
    })
}

fn chain_name(name: &str) -> Result<nlink::netlink::nftables::ChainName, NetlinkError> {
    nlink::netlink::nftables::ChainName::new(name).map_err(|e| NetlinkError::Build(e.to_string()))
}

fn nl_verdict(v: &Verdict) -> Result<NlVerdict, NetlinkError> {
    Ok(match v {
        Verdict::Goto(c) => NlVerdict::GotoTo(chain_name(c)?),
        Verdict::Drop => NlVerdict::Drop,
    })
}

/// Words (32-bit registers) a packet field takes.
fn words(family: Family, e: Expr) -> usize {
    match (e, family) {
        (Expr::Saddr | Expr::Daddr, Family::V6) => 4,
        _ => 1,
    }
}

fn reg(word: usize) -> Result<Register, NetlinkError> {
    Register::word(word).ok_or_else(|| NetlinkError::Build(format!("no register word {word}")))
}

/// Loads `keys` into consecutive registers from word 0, as nft lays out a
/// concatenation; returns the loads and the first register.
fn load(family: Family, keys: &[Expr]) -> Result<(Vec<NlExpr>, Register), NetlinkError> {
    let mut out = Vec::new();
    let mut w = 0;
    let (saddr, daddr, len) = match family {
        Family::V4 => (12, 16, 4),
        Family::V6 => (8, 24, 16),
    };
    for k in keys {
        let dreg = reg(w)?;
        out.push(match k {
            Expr::Saddr => NlExpr::Payload {
                dreg,
                base: PayloadBase::Network,
                offset: saddr,
                len,
            },
            Expr::Daddr => NlExpr::Payload {
                dreg,
                base: PayloadBase::Network,
                offset: daddr,
                len,
            },
            Expr::L4Proto => NlExpr::Meta {
                dreg,
                key: MetaKey::L4Proto,
            },
            Expr::Dport => NlExpr::Payload {
                dreg,
                base: PayloadBase::Transport,
                offset: 2,
                len: 2,
            },
            Expr::Random(n) => NlExpr::Numgen {
                dreg,
                kind: NumgenKind::Random,
                modulus: *n,
                offset: 0,
            },
        });
        w += words(family, *k);
    }
    Ok((out, reg(0)?))
}

/// One netlink attribute: length, type, value (padded to 4 bytes).
fn nla(kind: u16, value: &[u8]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + value.len() + 3);
    b.extend_from_slice(&((4 + value.len()) as u16).to_ne_bytes());
    b.extend_from_slice(&kind.to_ne_bytes());
    b.extend_from_slice(value);
    while b.len() % 4 != 0 {
        b.push(0);
    }
    b
}

fn nla_u32(kind: u16, v: u32) -> Vec<u8> {
    nla(kind, &v.to_be_bytes())
}

/// `nat` with its address and port taken from registers (nlink's typed
/// form has no public constructor). Attributes from uapi nf_tables.h.
fn dnat_from_registers(family: Family, addr: Register, port: Register) -> NlExpr {
    const NFTA_NAT_TYPE: u16 = 1;
    const NFTA_NAT_FAMILY: u16 = 2;
    const NFTA_NAT_REG_ADDR_MIN: u16 = 3;
    const NFTA_NAT_REG_PROTO_MIN: u16 = 5;
    const NFTA_NAT_FLAGS: u16 = 7;
    const NFT_NAT_DNAT: u32 = 1;
    // NF_NAT_RANGE_MAP_IPS | NF_NAT_RANGE_PROTO_SPECIFIED
    const FLAGS: u32 = 0x1 | 0x2;
    let nfproto = match family {
        Family::V4 => 2,
        Family::V6 => 10,
    };
    let mut data = nla_u32(NFTA_NAT_TYPE, NFT_NAT_DNAT);
    data.extend(nla_u32(NFTA_NAT_FAMILY, nfproto));
    data.extend(nla_u32(NFTA_NAT_REG_ADDR_MIN, addr.wire()));
    data.extend(nla_u32(NFTA_NAT_REG_PROTO_MIN, port.wire()));
    data.extend(nla_u32(NFTA_NAT_FLAGS, FLAGS));
    NlExpr::Raw(RawExpr::new("nat", data))
}

/// `masquerade fully-random` (nlink's `MasqExpr` has no flags).
fn masquerade_fully_random() -> NlExpr {
    const NFTA_MASQ_FLAGS: u16 = 1;
    const NF_NAT_RANGE_PROTO_RANDOM_FULLY: u32 = 0x10;
    NlExpr::Raw(RawExpr::new(
        "masq",
        nla_u32(NFTA_MASQ_FLAGS, NF_NAT_RANGE_PROTO_RANDOM_FULLY),
    ))
}

fn immediate_verdict(v: NlVerdict) -> NlExpr {
    NlExpr::Verdict(v)
}

/// `<word> & bits != 0`: the word `load` puts into `r`, masked, compared
/// with zero (the conntrack status, the packet mark).
fn bits_set(out: &mut Vec<NlExpr>, r: Register, load: NlExpr, bits: u32) {
    out.push(load);
    out.push(NlExpr::Bitwise {
        sreg: r,
        dreg: r,
        len: 4,
        mask: bits.to_ne_bytes().to_vec(),
        xor: 0u32.to_ne_bytes().to_vec(),
    });
    out.push(NlExpr::Cmp {
        sreg: r,
        op: CmpOp::Neq,
        data: 0u32.to_ne_bytes().to_vec(),
    });
}

/// A rule as nftables expressions.
pub fn encode_rule(family: Family, rule: &Rule) -> Result<Vec<NlExpr>, NetlinkError> {
    let mut out = Vec::new();
    let r0 = reg(0)?;
    for stmt in &rule.0 {
        match stmt {
            Stmt::InSet { keys, set, negate } => {
                let (loads, first) = load(family, keys)?;
                out.extend(loads);
                let mut l = LookupExpr::new(set.as_str(), first);
                if *negate {
                    l = l.invert();
                }
                out.push(NlExpr::Lookup(l));
            }
            Stmt::CtNew => {
                const NEW: u32 = 8;
                let load = NlExpr::Ct {
                    dreg: r0,
                    key: CtKey::State,
                };
                bits_set(&mut out, r0, load, NEW);
            }
            Stmt::CtDnat => {
                const IPS_DST_NAT: u32 = 1 << 5;
                let load = NlExpr::Ct {
                    dreg: r0,
                    key: CtKey::Status,
                };
                bits_set(&mut out, r0, load, IPS_DST_NAT);
            }
            Stmt::FibLocal { saddr } => {
                const RTN_LOCAL: u32 = 2;
                let flags = if *saddr {
                    FibFlags::SADDR
                } else {
                    FibFlags::DADDR
                };
                out.push(NlExpr::Fib {
                    dreg: r0,
                    result: FibResult::AddrType,
                    flags,
                });
                out.push(NlExpr::Cmp {
                    sreg: r0,
                    op: CmpOp::Eq,
                    data: RTN_LOCAL.to_ne_bytes().to_vec(),
                });
            }
            Stmt::L4Proto(p) => {
                out.push(NlExpr::Meta {
                    dreg: r0,
                    key: MetaKey::L4Proto,
                });
                out.push(NlExpr::Cmp {
                    sreg: r0,
                    op: CmpOp::Eq,
                    data: vec![p.number()],
                });
            }
            Stmt::RandomIs { modulus, value } => {
                out.push(NlExpr::Numgen {
                    dreg: r0,
                    kind: NumgenKind::Random,
                    modulus: *modulus,
                    offset: 0,
                });
                out.push(NlExpr::Cmp {
                    sreg: r0,
                    op: CmpOp::Eq,
                    data: value.to_ne_bytes().to_vec(),
                });
            }
            Stmt::MarkHas(bit) => {
                let load = NlExpr::Meta {
                    dreg: r0,
                    key: MetaKey::Mark,
                };
                bits_set(&mut out, r0, load, *bit);
            }
            Stmt::MarkSet(bit) | Stmt::MarkClear(bit) => {
                // mark = (mark & mask) ^ xor: OR keeps the other bits and
                // sets ours; XOR flips ours (known to be set) to zero.
                let (mask, xor) = if matches!(stmt, Stmt::MarkSet(_)) {
                    (!bit, *bit)
                } else {
                    (u32::MAX, *bit)
                };
                out.push(NlExpr::Meta {
                    dreg: r0,
                    key: MetaKey::Mark,
                });
                out.push(NlExpr::Bitwise {
                    sreg: r0,
                    dreg: r0,
                    len: 4,
                    mask: mask.to_ne_bytes().to_vec(),
                    xor: xor.to_ne_bytes().to_vec(),
                });
                out.push(NlExpr::MetaSet {
                    key: MetaKey::Mark,
                    sreg: r0,
                });
            }
            Stmt::UpdateSaddr { set } => {
                let (loads, first) = load(family, &[Expr::Saddr])?;
                out.extend(loads);
                out.push(NlExpr::Dynset(nlink::netlink::nftables::DynsetExpr::new(
                    nlink::netlink::nftables::DynsetOp::Update,
                    set.as_str(),
                    first,
                )));
            }
            Stmt::Vmap { keys, map } => {
                let (loads, first) = load(family, keys)?;
                out.extend(loads);
                out.push(NlExpr::Lookup(
                    LookupExpr::new(map.as_str(), first).dreg(Register::Verdict),
                ));
            }
            Stmt::DnatMap { keys, map } => {
                let (loads, first) = load(family, keys)?;
                out.extend(loads);
                out.push(NlExpr::Lookup(
                    LookupExpr::new(map.as_str(), first).dreg(first),
                ));
                // The map yields address . port: the port follows the
                // address's words.
                let port = reg(words(family, Expr::Daddr))?;
                out.push(dnat_from_registers(family, first, port));
            }
            Stmt::Dnat { addr, port } => {
                let port_reg = reg(words(family, Expr::Daddr))?;
                let bytes = match addr {
                    IpAddr::V4(a) => a.octets().to_vec(),
                    IpAddr::V6(a) => a.octets().to_vec(),
                };
                out.push(NlExpr::Immediate {
                    dreg: r0,
                    data: bytes,
                });
                out.push(NlExpr::Immediate {
                    dreg: port_reg,
                    data: port.to_be_bytes().to_vec(),
                });
                out.push(dnat_from_registers(family, r0, port_reg));
            }
            Stmt::MasqueradeFullyRandom => out.push(masquerade_fully_random()),
            Stmt::Reject => {
                // ICMP(v6) port unreachable, as `reject` is in ip and ip6
                // tables: the client sees "connection refused" at once.
                const NFT_REJECT_ICMP_UNREACH: u32 = 0;
                let code = match family {
                    Family::V4 => 3,
                    Family::V6 => 4,
                };
                out.push(NlExpr::Reject {
                    reject_type: NFT_REJECT_ICMP_UNREACH,
                    icmp_code: code,
                });
            }
            Stmt::Drop => out.push(immediate_verdict(NlVerdict::Drop)),
            Stmt::Jump(c) => out.push(immediate_verdict(NlVerdict::JumpTo(chain_name(c)?))),
            Stmt::Goto(c) => out.push(immediate_verdict(NlVerdict::GotoTo(chain_name(c)?))),
        }
    }
    Ok(out)
}
