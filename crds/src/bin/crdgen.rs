//! Writes FerroLB's CRD manifests, generated from the Rust types, into
//! `crds/manifests/` and `charts/ferrolb/crds/`.
//!
//! Usage: `cargo run -p ferrolb-crds --bin ferrolb-crdgen [WORKSPACE_ROOT]`.

use std::path::PathBuf;

use anyhow::Context;
use ferrolb_crds::manifests;

fn main() -> anyhow::Result<()> {
    let root = std::env::args_os()
        .nth(1)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(".."));
    let files = manifests::render().context("rendering CRDs")?;
    for dir in manifests::OUTPUT_DIRS {
        let dir = root.join(dir);
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        for (name, yaml) in &files {
            let path = dir.join(name);
            std::fs::write(&path, yaml).with_context(|| format!("writing {}", path.display()))?;
            println!("wrote {}", path.display());
        }
    }
    Ok(())
}
