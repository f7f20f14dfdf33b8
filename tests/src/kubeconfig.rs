//! Kubeconfig files for the lab's identities. Plain text on purpose: one
//! cluster, one user, one context, paths to the PKI files.

use std::path::Path;

use crate::addresses;

pub enum Credentials<'a> {
    /// A client certificate and key (admin and control-plane components).
    Cert { cert: &'a Path, key: &'a Path },
    /// A ServiceAccount token (FerroLB's components, so RBAC applies to them).
    Token(&'a str),
}

pub fn server_url() -> String {
    format!(
        "https://{}:{}",
        addresses::control_plane_v4(),
        addresses::APISERVER_PORT
    )
}

/// Renders a kubeconfig. Paths and tokens are quoted as YAML double-quoted
/// scalars via JSON escaping (JSON strings are valid YAML).
pub fn render(user: &str, ca: &Path, creds: &Credentials<'_>) -> String {
    let q = |s: &str| serde_json::Value::String(s.to_string()).to_string();
    let user_block = match creds {
        Credentials::Cert { cert, key } => format!(
            "    client-certificate: {}\n    client-key: {}\n",
            q(&cert.display().to_string()),
            q(&key.display().to_string())
        ),
        Credentials::Token(t) => format!("    token: {}\n", q(t)),
    };
    format!(
        "apiVersion: v1\nkind: Config\nclusters:\n- name: ferrolb-lab\n  cluster:\n    server: {server}\n    certificate-authority: {ca}\n\
         users:\n- name: {user}\n  user:\n{user_block}contexts:\n- name: ferrolb-lab\n  context:\n    cluster: ferrolb-lab\n    user: {user}\n\
         current-context: ferrolb-lab\n",
        server = q(&server_url()),
        ca = q(&ca.display().to_string()),
        user = q(user),
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renders_a_kubeconfig_kube_rs_can_read() {
        let text = render(
            "admin",
            Path::new("/s/ca.crt"),
            &Credentials::Cert {
                cert: Path::new("/s/a.crt"),
                key: Path::new("/s/a.key"),
            },
        );
        let kc: kube::config::Kubeconfig =
            serde_saphyr::from_str(&text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        assert_eq!(kc.current_context.as_deref(), Some("ferrolb-lab"));
        let cluster = kc.clusters[0].cluster.as_ref().unwrap();
        assert_eq!(cluster.server.as_deref(), Some("https://198.18.0.1:6443"));
        let tok = render("sa", Path::new("/ca"), &Credentials::Token("abc\"def"));
        let kc: kube::config::Kubeconfig = serde_saphyr::from_str(&tok).unwrap();
        assert!(kc.auth_infos[0].auth_info.as_ref().unwrap().token.is_some());
    }
}
