//! Readiness: a process is ready once every watch it registered has synced.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, PoisonError};

/// Shared readiness state. Cloning shares it.
#[derive(Debug, Clone, Default)]
pub struct Readiness {
    gates: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// One condition for readiness, e.g. "the Service cache has synced".
#[derive(Debug)]
pub struct Gate {
    name: String,
    readiness: Readiness,
}

impl Readiness {
    /// Adds a gate that starts closed.
    pub fn gate(&self, name: impl Into<String>) -> Gate {
        let name = name.into();
        self.set(&name, false);
        Gate {
            name,
            readiness: self.clone(),
        }
    }

    /// Names of the gates still closed; empty means ready. With no gate at
    /// all the process is not ready: it has not started its work yet.
    pub fn pending(&self) -> Vec<String> {
        let gates = self.gates.lock().unwrap_or_else(PoisonError::into_inner);
        if gates.is_empty() {
            return vec!["startup".to_string()];
        }
        gates
            .iter()
            .filter(|(_, open)| !**open)
            .map(|(name, _)| name.clone())
            .collect()
    }

    pub fn is_ready(&self) -> bool {
        self.pending().is_empty()
    }

    fn set(&self, name: &str, open: bool) {
        self.gates
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .insert(name.to_string(), open);
    }
}

impl Gate {
    /// Opens the gate.
    pub fn open(&self) {
        self.readiness.set(&self.name, true);
    }

    /// Closes it again, e.g. when a watch lost its connection for good.
    pub fn close(&self) {
        self.readiness.set(&self.name, false);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ready_only_when_every_gate_is_open() {
        let r = Readiness::default();
        assert!(!r.is_ready(), "no gates yet means not started");
        let a = r.gate("services");
        let b = r.gate("pools");
        assert_eq!(r.pending(), vec!["pools", "services"]);
        a.open();
        assert_eq!(r.pending(), vec!["pools"]);
        b.open();
        assert!(r.is_ready());
        b.close();
        assert!(!r.is_ready());
    }
}
