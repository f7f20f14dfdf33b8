//! Label selectors as plain data, so pool eligibility is decided without kube
//! types. `convert` builds them from `metav1.LabelSelector`.

use std::collections::BTreeMap;

pub type Labels = BTreeMap<String, String>;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Operator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Requirement {
    pub key: String,
    pub operator: Operator,
    pub values: Vec<String>,
}

/// Kubernetes selector semantics: every `match_labels` pair and every
/// requirement must hold; the empty selector matches everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Selector {
    pub match_labels: Labels,
    pub requirements: Vec<Requirement>,
}

impl Selector {
    pub fn matches(&self, labels: &Labels) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.requirements.iter().all(|r| r.matches(labels))
    }
}

impl Requirement {
    fn matches(&self, labels: &Labels) -> bool {
        let value = labels.get(&self.key);
        match self.operator {
            Operator::In => value.is_some_and(|v| self.values.contains(v)),
            // Like Kubernetes: NotIn also matches objects without the key.
            Operator::NotIn => value.is_none_or(|v| !self.values.contains(v)),
            Operator::Exists => value.is_some(),
            Operator::DoesNotExist => value.is_none(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> Labels {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    fn req(key: &str, operator: Operator, values: &[&str]) -> Requirement {
        Requirement {
            key: key.into(),
            operator,
            values: values.iter().map(|v| v.to_string()).collect(),
        }
    }

    #[test]
    fn empty_selector_matches_everything() {
        assert!(Selector::default().matches(&Labels::new()));
    }

    #[test]
    fn operators_follow_kubernetes() {
        let l = labels(&[("tier", "web"), ("env", "prod")]);
        let sel = |r| Selector {
            match_labels: Labels::new(),
            requirements: vec![r],
        };
        assert!(sel(req("tier", Operator::In, &["web", "api"])).matches(&l));
        assert!(!sel(req("tier", Operator::In, &["api"])).matches(&l));
        assert!(sel(req("tier", Operator::NotIn, &["api"])).matches(&l));
        assert!(sel(req("missing", Operator::NotIn, &["x"])).matches(&l));
        assert!(sel(req("env", Operator::Exists, &[])).matches(&l));
        assert!(!sel(req("env", Operator::DoesNotExist, &[])).matches(&l));
        let both = Selector {
            match_labels: labels(&[("env", "prod")]),
            requirements: vec![req("tier", Operator::In, &["api"])],
        };
        assert!(!both.matches(&l), "every part must hold");
    }
}
