//! The committed CRD YAML must be exactly what the types generate.

use std::path::Path;

use ferrolb_crds::manifests;

#[test]
fn committed_manifests_match_the_types() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
    let files = manifests::render().expect("CRDs render");
    assert_eq!(files.len(), 2);
    for dir in manifests::OUTPUT_DIRS {
        for (name, yaml) in &files {
            let path = root.join(dir).join(name);
            let committed = std::fs::read_to_string(&path).unwrap_or_default();
            assert!(
                committed == *yaml,
                "{} is out of date; run `cargo run -p ferrolb-crds --bin ferrolb-crdgen`",
                path.display()
            );
        }
    }
}

#[test]
fn crds_are_cluster_scoped_with_status_and_short_names() {
    for crd in manifests::definitions() {
        let name = crd.metadata.name.clone().unwrap_or_default();
        assert_eq!(crd.spec.scope, "Cluster", "{name}");
        assert_eq!(crd.spec.group, "ferrolb.io");
        let version = &crd.spec.versions[0];
        assert_eq!(version.name, "v1beta1");
        assert!(
            version
                .subresources
                .as_ref()
                .and_then(|s| s.status.as_ref())
                .is_some(),
            "{name} has a status subresource"
        );
        assert!(
            crd.spec
                .names
                .short_names
                .as_ref()
                .is_some_and(|s| !s.is_empty()),
            "{name}"
        );
    }
}

#[test]
fn pool_schema_carries_cel_rules_and_descriptions() {
    let yaml: String = manifests::render()
        .unwrap()
        .into_iter()
        .map(|(_, y)| y)
        .collect();
    assert!(yaml.contains("x-kubernetes-validations"));
    assert!(yaml.contains("isCIDR(self)"));
    assert!(yaml.contains("Addresses this pool hands out"));
    assert!(yaml.contains("avoidBuggyIPs"));
}
