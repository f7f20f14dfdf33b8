//! Label selectors as plain data, shared by the controller (pool
//! eligibility) and the speaker (which nodes and Services an
//! L2Advertisement covers), so both decide with one implementation and
//! without kube types. [`from_label_selector`] converts a
//! `metav1.LabelSelector` once, at the edge.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector;

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

/// Why a `LabelSelector` was refused. The message is a field suffix
/// (`.matchExpressions[0].operator: …`), so a caller can prefix the path of
/// the selector and put the whole into a condition or an Event.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SelectorError {
    #[error(".matchExpressions[{index}].operator: unknown operator {operator:?}")]
    UnknownOperator { index: usize, operator: String },
}

/// A refused selector in a list, named by its full field path
/// (`spec.nodeSelectors[1].matchExpressions[0].operator: …`).
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}[{index}]{error}")]
pub struct FieldError {
    pub field: String,
    pub index: usize,
    pub error: SelectorError,
}

/// A `metav1.LabelSelector` as plain data.
pub fn from_label_selector(sel: &LabelSelector) -> Result<Selector, SelectorError> {
    let requirements = sel
        .match_expressions
        .as_deref()
        .unwrap_or_default()
        .iter()
        .enumerate()
        .map(|(index, e)| {
            let operator = match e.operator.as_str() {
                "In" => Operator::In,
                "NotIn" => Operator::NotIn,
                "Exists" => Operator::Exists,
                "DoesNotExist" => Operator::DoesNotExist,
                other => {
                    return Err(SelectorError::UnknownOperator {
                        index,
                        operator: other.to_string(),
                    });
                }
            };
            Ok(Requirement {
                key: e.key.clone(),
                operator,
                values: e.values.clone().unwrap_or_default(),
            })
        })
        .collect::<Result<Vec<_>, _>>()?;
    Ok(Selector {
        match_labels: sel
            .match_labels
            .clone()
            .unwrap_or_default()
            .into_iter()
            .collect(),
        requirements,
    })
}

/// Every selector of a list field such as `spec.nodeSelectors`; the first
/// refusal is named by `field` and its index.
pub fn from_label_selectors(
    list: &[LabelSelector],
    field: &str,
) -> Result<Vec<Selector>, FieldError> {
    list.iter()
        .enumerate()
        .map(|(index, s)| {
            from_label_selector(s).map_err(|error| FieldError {
                field: field.to_string(),
                index,
                error,
            })
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelectorRequirement;

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

    #[test]
    fn converts_labels_and_expressions() {
        let sel = LabelSelector {
            match_labels: Some([("zone".to_string(), "a".to_string())].into()),
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "role".into(),
                operator: "NotIn".into(),
                values: Some(vec!["edge".into()]),
            }]),
        };
        assert_eq!(
            from_label_selector(&sel).unwrap(),
            Selector {
                match_labels: labels(&[("zone", "a")]),
                requirements: vec![req("role", Operator::NotIn, &["edge"])],
            }
        );
        assert_eq!(
            from_label_selector(&LabelSelector::default()).unwrap(),
            Selector::default()
        );
    }

    #[test]
    fn errors_name_the_field() {
        let bad = LabelSelector {
            match_expressions: Some(vec![LabelSelectorRequirement {
                key: "a".into(),
                operator: "Maybe".into(),
                values: None,
            }]),
            match_labels: None,
        };
        let e = from_label_selectors(&[LabelSelector::default(), bad], "spec.nodeSelectors")
            .unwrap_err();
        assert_eq!(
            e.to_string(),
            "spec.nodeSelectors[1].matchExpressions[0].operator: unknown operator \"Maybe\""
        );
    }
}
