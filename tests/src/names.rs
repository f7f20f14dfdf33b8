//! Names of everything the lab creates, all carrying the per-run prefix so a
//! crashed run's leftovers can be found and removed, and parsing of the
//! targets the CLI accepts (`node-2`, `pod/default/web-1`, `speaker@node-1`).

use std::fmt;
use std::str::FromStr;

use crate::addresses::MAX_NODES;

/// Prefix of a lab run. Short because it ends up in interface names (15 bytes).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Prefix(String);

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum NameError {
    #[error("prefix {0:?} must be 1-8 characters of a-z and 0-9, starting with a letter")]
    BadPrefix(String),
    #[error("{0:?} is not a lab node (expected node-1 .. node-{MAX_NODES})")]
    BadNode(String),
    #[error("{0:?} is not a namespace target (expected client, node-N or pod/NAMESPACE/NAME)")]
    BadTarget(String),
    #[error("{0:?} is not a component (expected controller, speaker[@node-N] or proxy[@node-N])")]
    BadComponent(String),
    #[error("the controller runs once in the root namespace; drop the @{0}")]
    ControllerOnNode(String),
}

impl FromStr for Prefix {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let ok = !s.is_empty()
            && s.len() <= 8
            && s.starts_with(|c: char| c.is_ascii_lowercase())
            && s.chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit());
        if ok {
            Ok(Prefix(s.to_string()))
        } else {
            Err(NameError::BadPrefix(s.to_string()))
        }
    }
}

impl fmt::Display for Prefix {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl Prefix {
    pub fn as_str(&self) -> &str {
        &self.0
    }

    /// Netns holding the LAN bridge.
    pub fn lan_netns(&self) -> String {
        format!("{}-lan", self.0)
    }

    pub fn node_netns(&self, n: u8) -> String {
        format!("{}-{}", self.0, node_name(n))
    }

    pub fn client_netns(&self) -> String {
        format!("{}-client", self.0)
    }

    /// A pod's netns is named from its uid, never its name: a replacement
    /// pod of the same name gets a netns of its own, so its predecessor's
    /// late cleanup can never tear it down. `ferrolb-lab exec pod/NS/NAME`
    /// finds it through the pod record in the state directory.
    pub fn pod_netns(&self, uid: &str) -> String {
        let short: String = uid.chars().filter(|c| *c != '-').collect();
        format!("{}-pod-{short}", self.0)
    }

    /// The root namespace's end of the veth onto the LAN.
    pub fn root_link(&self) -> String {
        format!("{}-cp", self.0)
    }

    /// True for every netns name this prefix owns.
    pub fn owns_netns(&self, netns: &str) -> bool {
        netns
            .strip_prefix(self.0.as_str())
            .is_some_and(|rest| rest.starts_with('-'))
    }
}

pub fn node_name(n: u8) -> String {
    format!("node-{n}")
}

/// `node-3` → 3.
pub fn parse_node(s: &str) -> Result<u8, NameError> {
    s.strip_prefix("node-")
        .and_then(|n| n.parse::<u8>().ok())
        .filter(|n| (1..=MAX_NODES).contains(n))
        .ok_or_else(|| NameError::BadNode(s.to_string()))
}

/// Where `exec` runs a command.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Target {
    Client,
    Node(u8),
    Pod { namespace: String, name: String },
}

impl FromStr for Target {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        if s == "client" {
            return Ok(Target::Client);
        }
        if let Some(rest) = s.strip_prefix("pod/") {
            return match rest.split_once('/') {
                Some((ns, name)) if !ns.is_empty() && !name.is_empty() && !name.contains('/') => {
                    Ok(Target::Pod {
                        namespace: ns.to_string(),
                        name: name.to_string(),
                    })
                }
                _ => Err(NameError::BadTarget(s.to_string())),
            };
        }
        if s.starts_with("node-") {
            return parse_node(s).map(Target::Node);
        }
        Err(NameError::BadTarget(s.to_string()))
    }
}

impl Target {
    /// The netns to run in; a pod's comes from its record in the state
    /// directory (`None` when the lab does not run that pod).
    pub fn netns(&self, prefix: &Prefix, state: &crate::state::StateDir) -> Option<String> {
        match self {
            Target::Client => Some(prefix.client_netns()),
            Target::Node(n) => Some(prefix.node_netns(*n)),
            Target::Pod { namespace, name } => state.read_pod(namespace, name).map(|r| r.netns),
        }
    }
}

/// The processes `kill`/`start`/`logs` know about.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Kind {
    Etcd,
    Apiserver,
    ControllerManager,
    Scheduler,
    Controller,
    Speaker,
    Proxy,
    KubeProxy,
    Supervisor,
}

impl Kind {
    pub fn as_str(self) -> &'static str {
        match self {
            Kind::Etcd => "etcd",
            Kind::Apiserver => "apiserver",
            Kind::ControllerManager => "controller-manager",
            Kind::Scheduler => "scheduler",
            Kind::Controller => "controller",
            Kind::Speaker => "speaker",
            Kind::Proxy => "proxy",
            Kind::KubeProxy => "kube-proxy",
            Kind::Supervisor => "supervisor",
        }
    }

    /// Runs once per node (in the node netns) rather than once per lab.
    pub fn per_node(self) -> bool {
        matches!(self, Kind::Speaker | Kind::Proxy | Kind::KubeProxy)
    }

    pub const ALL: [Kind; 9] = [
        Kind::Etcd,
        Kind::Apiserver,
        Kind::ControllerManager,
        Kind::Scheduler,
        Kind::Controller,
        Kind::Speaker,
        Kind::Proxy,
        Kind::KubeProxy,
        Kind::Supervisor,
    ];
}

/// One process of the lab: `speaker@node-2`, `apiserver`, ...
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Component {
    pub kind: Kind,
    pub node: Option<u8>,
}

impl FromStr for Component {
    type Err = NameError;
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let (kind_str, node) = match s.split_once('@') {
            Some((k, n)) => (k, Some(n)),
            None => (s, None),
        };
        let kind = Kind::ALL
            .into_iter()
            .find(|k| k.as_str() == kind_str)
            .ok_or_else(|| NameError::BadComponent(s.to_string()))?;
        let node = match node {
            None => None,
            Some(n) if kind.per_node() => Some(parse_node(n)?),
            Some(n) => return Err(NameError::ControllerOnNode(n.to_string())),
        };
        Ok(Component { kind, node })
    }
}

impl fmt::Display for Component {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.node {
            Some(n) => write!(f, "{}@{}", self.kind.as_str(), node_name(n)),
            None => f.write_str(self.kind.as_str()),
        }
    }
}

impl Component {
    pub fn new(kind: Kind, node: Option<u8>) -> Self {
        Component { kind, node }
    }

    /// Expands `speaker` (no node) to `speaker@node-1..N`.
    pub fn expand(&self, nodes: u8) -> Vec<Component> {
        match (self.kind.per_node(), self.node) {
            (true, None) => (1..=nodes)
                .map(|n| Component::new(self.kind, Some(n)))
                .collect(),
            _ => vec![self.clone()],
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes() {
        assert!("flb".parse::<Prefix>().is_ok());
        assert!("flbt2".parse::<Prefix>().is_ok());
        for bad in ["", "9ab", "Flb", "toolongprefix", "a-b"] {
            assert!(bad.parse::<Prefix>().is_err(), "{bad}");
        }
        let p: Prefix = "flb".parse().unwrap();
        assert_eq!(p.node_netns(2), "flb-node-2");
        assert!(p.owns_netns(&p.pod_netns("0b3c5d2e-8f1a-4c6b-9d7e-112233445566")));
        assert_eq!(
            p.pod_netns("0b3c5d2e-8f1a-4c6b-9d7e-112233445566"),
            "flb-pod-0b3c5d2e8f1a4c6b9d7e112233445566"
        );
        assert!(!p.owns_netns("flbt-node-1"));
        assert!(p.root_link().len() <= 15);
        let longest: Prefix = "abcdefgh".parse().unwrap();
        assert!(
            longest.root_link().len() <= 15,
            "interface names are at most 15 bytes"
        );
    }

    #[test]
    fn targets() {
        assert_eq!("client".parse::<Target>(), Ok(Target::Client));
        assert_eq!("node-3".parse::<Target>(), Ok(Target::Node(3)));
        assert_eq!(
            "pod/default/web-1".parse::<Target>(),
            Ok(Target::Pod {
                namespace: "default".into(),
                name: "web-1".into()
            })
        );
        for bad in [
            "node-0",
            "node-10",
            "pod/x",
            "pod//a",
            "pod/a/b/c",
            "server",
        ] {
            assert!(bad.parse::<Target>().is_err(), "{bad}");
        }
    }

    #[test]
    fn components() {
        let c: Component = "speaker@node-2".parse().unwrap();
        assert_eq!(c, Component::new(Kind::Speaker, Some(2)));
        assert_eq!(c.to_string(), "speaker@node-2");
        let all: Component = "proxy".parse().unwrap();
        assert_eq!(all.expand(3).len(), 3);
        assert_eq!(
            "controller".parse::<Component>().unwrap().expand(3).len(),
            1
        );
        assert!("controller@node-1".parse::<Component>().is_err());
        assert!("bogus".parse::<Component>().is_err());
        assert!("speaker@node-12".parse::<Component>().is_err());
    }
}
