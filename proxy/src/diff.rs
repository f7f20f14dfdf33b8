//! What to send the kernel: the changes that turn the committed ruleset
//! into the desired one, in an order the kernel accepts inside one
//! transaction (things exist before they are referenced and are no longer
//! referenced when they go). Pure; [`apply`] plays the same operations on a
//! value, which the tests use to prove that a sync applied makes the next
//! diff empty.

use std::collections::BTreeMap;

use crate::ruleset::{Base, Chain, Data, Rule, Ruleset, Set, Value};

/// One step of a transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Our table, fresh: deletes any table of that name first.
    ReplaceTable,
    AddSet {
        name: String,
        set: Set,
    },
    AddChain {
        name: String,
        base: Option<Base>,
    },
    FlushChain(String),
    AddRule {
        chain: String,
        rule: Rule,
    },
    AddElements {
        set: String,
        elements: Vec<(Vec<Value>, Option<Data>)>,
    },
    DeleteElements {
        set: String,
        keys: Vec<Vec<Value>>,
    },
    DeleteChain(String),
    DeleteSet(String),
}

/// Everything needed to build `desired` from nothing.
pub fn full(desired: &Ruleset) -> Vec<Op> {
    let mut ops = vec![Op::ReplaceTable];
    for (name, set) in &desired.sets {
        ops.push(Op::AddSet {
            name: name.clone(),
            set: Set {
                elements: BTreeMap::new(),
                ..set.clone()
            },
        });
    }
    // Regular chains before base chains, so every jump target exists once a
    // hook starts running rules (it does not matter inside one transaction,
    // but keeps a listing readable).
    let mut chains: Vec<(&String, &Chain)> = desired.chains.iter().collect();
    chains.sort_by_key(|(_, c)| c.base.is_some());
    for (name, chain) in &chains {
        ops.push(Op::AddChain {
            name: (*name).clone(),
            base: chain.base,
        });
    }
    for (name, set) in &desired.sets {
        if !set.elements.is_empty() {
            ops.push(Op::AddElements {
                set: name.clone(),
                elements: set
                    .elements
                    .iter()
                    .map(|(k, d)| (k.clone(), d.clone()))
                    .collect(),
            });
        }
    }
    for (name, chain) in &chains {
        for rule in &chain.rules {
            ops.push(Op::AddRule {
                chain: (*name).clone(),
                rule: rule.clone(),
            });
        }
    }
    ops
}

/// A new chain and its rules.
pub fn create_chain(name: String, chain: Chain, ops: &mut Vec<Op>) {
    ops.push(Op::AddChain {
        name: name.clone(),
        base: chain.base,
    });
    ops.extend(chain.rules.into_iter().map(|rule| Op::AddRule {
        chain: name.clone(),
        rule,
    }));
}

/// Where an operation goes in a transaction: things exist before they are
/// referenced, and are no longer referenced when they go.
fn phase(op: &Op) -> u8 {
    match op {
        Op::ReplaceTable => 0,
        Op::AddSet { .. } => 1,
        Op::AddChain { .. } => 2,
        Op::DeleteElements { .. } => 3,
        Op::AddElements { .. } => 4,
        Op::FlushChain(_) | Op::AddRule { .. } => 5,
        Op::DeleteChain(_) => 6,
        Op::DeleteSet(_) => 7,
    }
}

/// Operations from several sources in one valid order (stable: a chain's
/// flush stays before its new rules).
pub fn ordered(mut ops: Vec<Op>) -> Vec<Op> {
    ops.sort_by_key(phase);
    ops
}

/// The partial update from `old` to `new`, or `None` when only a full
/// rebuild can do it (a set changed its definition, or the table its name
/// or family). An empty list means nothing to do.
pub fn diff(old: &Ruleset, new: &Ruleset) -> Option<Vec<Op>> {
    if old.family != new.family || old.table != new.table {
        return None;
    }
    for (name, set) in &new.sets {
        if let Some(o) = old.sets.get(name)
            && !o.same_shape(set)
        {
            return None;
        }
    }
    for (name, chain) in &new.chains {
        if let Some(o) = old.chains.get(name)
            && o.base != chain.base
        {
            return None;
        }
    }
    let mut ops = Vec::new();
    for (name, set) in &new.sets {
        if !old.sets.contains_key(name) {
            ops.push(Op::AddSet {
                name: name.clone(),
                set: Set {
                    elements: BTreeMap::new(),
                    ..set.clone()
                },
            });
        }
    }
    for (name, chain) in &new.chains {
        if !old.chains.contains_key(name) {
            ops.push(Op::AddChain {
                name: name.clone(),
                base: chain.base,
            });
        }
    }
    // Elements: deletions (and changed data) first, then additions.
    for (name, set) in &new.sets {
        let empty = BTreeMap::new();
        let before = old.sets.get(name).map(|s| &s.elements).unwrap_or(&empty);
        let gone: Vec<Vec<Value>> = before
            .iter()
            .filter(|(k, d)| set.elements.get(*k) != Some(d))
            .map(|(k, _)| k.clone())
            .collect();
        if !gone.is_empty() {
            ops.push(Op::DeleteElements {
                set: name.clone(),
                keys: gone,
            });
        }
    }
    for (name, set) in &new.sets {
        let empty = BTreeMap::new();
        let before = old.sets.get(name).map(|s| &s.elements).unwrap_or(&empty);
        let added: Vec<(Vec<Value>, Option<Data>)> = set
            .elements
            .iter()
            .filter(|(k, d)| before.get(*k) != Some(d))
            .map(|(k, d)| (k.clone(), d.clone()))
            .collect();
        if !added.is_empty() {
            ops.push(Op::AddElements {
                set: name.clone(),
                elements: added,
            });
        }
    }
    for (name, chain) in &new.chains {
        let changed = old.chains.get(name).is_none_or(|o| o.rules != chain.rules);
        if !changed {
            continue;
        }
        if old.chains.contains_key(name) {
            ops.push(Op::FlushChain(name.clone()));
        }
        for rule in &chain.rules {
            ops.push(Op::AddRule {
                chain: name.clone(),
                rule: rule.clone(),
            });
        }
    }
    // What goes: chains are emptied before any is deleted, since they may
    // jump to each other; then the sets only their rules used.
    let gone_chains: Vec<&String> = old
        .chains
        .keys()
        .filter(|n| !new.chains.contains_key(*n))
        .collect();
    for name in &gone_chains {
        ops.push(Op::FlushChain((*name).clone()));
    }
    for name in gone_chains {
        ops.push(Op::DeleteChain(name.clone()));
    }
    for name in old.sets.keys().filter(|n| !new.sets.contains_key(*n)) {
        ops.push(Op::DeleteSet(name.clone()));
    }
    Some(ops)
}

/// Plays `ops` on `rs`, as the kernel would.
pub fn apply(rs: &mut Ruleset, ops: &[Op]) {
    for op in ops {
        match op {
            Op::ReplaceTable => {
                rs.sets.clear();
                rs.chains.clear();
            }
            Op::AddSet { name, set } => {
                rs.sets.insert(name.clone(), set.clone());
            }
            Op::AddChain { name, base } => {
                rs.chains.insert(
                    name.clone(),
                    Chain {
                        base: *base,
                        rules: Vec::new(),
                    },
                );
            }
            Op::FlushChain(name) => {
                if let Some(c) = rs.chains.get_mut(name) {
                    c.rules.clear();
                }
            }
            Op::AddRule { chain, rule } => {
                if let Some(c) = rs.chains.get_mut(chain) {
                    c.rules.push(rule.clone());
                }
            }
            Op::AddElements { set, elements } => {
                if let Some(s) = rs.sets.get_mut(set) {
                    s.elements.extend(elements.iter().cloned());
                }
            }
            Op::DeleteElements { set, keys } => {
                if let Some(s) = rs.sets.get_mut(set) {
                    for k in keys {
                        s.elements.remove(k);
                    }
                }
            }
            Op::DeleteChain(name) => {
                rs.chains.remove(name);
            }
            Op::DeleteSet(name) => {
                rs.sets.remove(name);
            }
        }
    }
}

/// Elements a list of operations adds or deletes (for metrics and logs).
pub fn element_changes(ops: &[Op]) -> usize {
    ops.iter()
        .map(|op| match op {
            Op::AddElements { elements, .. } => elements.len(),
            Op::DeleteElements { keys, .. } => keys.len(),
            _ => 0,
        })
        .sum()
}
