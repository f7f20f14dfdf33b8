//! The lab's PKI, made with the openssl CLI: one CA, the API server's serving
//! certificate, client certificates for the admin (O=system:masters) and the
//! control-plane components, and the ServiceAccount signing key. EC P-256
//! throughout, because generating it takes milliseconds.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use crate::addresses::{self, IpFamily};

#[derive(Debug, thiserror::Error)]
pub enum CertError {
    #[error("openssl {what} failed: {stderr}")]
    Openssl { what: String, stderr: String },
    #[error("cannot run openssl (is it installed?): {0}")]
    Run(std::io::Error),
    #[error("cannot write {path}: {source}")]
    Write {
        path: String,
        source: std::io::Error,
    },
}

/// Client identities the lab issues, as (file stem, CN, O).
pub const CLIENTS: &[(&str, &str, Option<&str>)] = &[
    ("admin", "ferrolb-lab-admin", Some("system:masters")),
    ("controller-manager", "system:kube-controller-manager", None),
    ("scheduler", "system:kube-scheduler", None),
    // Bound to system:node-proxier by the default RBAC.
    ("kube-proxy", "system:kube-proxy", None),
];

#[derive(Clone, Debug)]
pub struct Pki {
    pub dir: PathBuf,
}

impl Pki {
    pub fn ca_cert(&self) -> PathBuf {
        self.dir.join("ca.crt")
    }
    pub fn ca_key(&self) -> PathBuf {
        self.dir.join("ca.key")
    }
    pub fn cert(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.crt"))
    }
    pub fn key(&self, stem: &str) -> PathBuf {
        self.dir.join(format!("{stem}.key"))
    }
    pub fn sa_key(&self) -> PathBuf {
        self.dir.join("sa.key")
    }
    pub fn sa_pub(&self) -> PathBuf {
        self.dir.join("sa.pub")
    }
}

fn openssl(what: &str, args: &[&str]) -> Result<(), CertError> {
    let out = Command::new("openssl")
        .args(args)
        .output()
        .map_err(CertError::Run)?;
    if out.status.success() {
        Ok(())
    } else {
        Err(CertError::Openssl {
            what: what.to_string(),
            stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
        })
    }
}

fn write(path: &Path, text: &str) -> Result<(), CertError> {
    fs::write(path, text).map_err(|source| CertError::Write {
        path: path.display().to_string(),
        source,
    })
}

/// Subject alternative names of the API server: every address a client may dial.
pub fn apiserver_sans(family: IpFamily) -> Vec<String> {
    let mut sans = vec![
        format!("IP:{}", addresses::control_plane_v4()),
        format!("IP:{}", addresses::kubernetes_service_v4()),
        "IP:127.0.0.1".to_string(),
    ];
    if family.has_v6() {
        sans.push(format!("IP:{}", addresses::control_plane_v6()));
        sans.push(format!("IP:{}", addresses::kubernetes_service_v6()));
    }
    for dns in [
        "kubernetes",
        "kubernetes.default",
        "kubernetes.default.svc",
        "kubernetes.default.svc.cluster.local",
        "localhost",
    ] {
        sans.push(format!("DNS:{dns}"));
    }
    sans
}

fn leaf_config(usage: &str, sans: Option<&[String]>) -> String {
    let mut c = String::from(
        "[req]\ndistinguished_name = dn\n[dn]\n[ext]\nbasicConstraints = critical,CA:FALSE\n\
         keyUsage = critical,digitalSignature,keyEncipherment\nauthorityKeyIdentifier = keyid\n",
    );
    c.push_str(&format!("extendedKeyUsage = {usage}\n"));
    if let Some(sans) = sans {
        c.push_str(&format!("subjectAltName = {}\n", sans.join(",")));
    }
    c
}

const EC: [&str; 4] = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1"];

fn issue(pki: &Pki, stem: &str, subject: &str, config: &str) -> Result<(), CertError> {
    let cfg = pki.dir.join(format!("{stem}.cnf"));
    write(&cfg, config)?;
    let (key, crt, cfg) = (pki.key(stem), pki.cert(stem), cfg.display().to_string());
    let (ca_crt, ca_key) = (pki.ca_cert(), pki.ca_key());
    let mut args = vec![
        "req",
        "-x509",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        subject,
        "-config",
        &cfg,
        "-extensions",
        "ext",
    ];
    args.extend_from_slice(&EC);
    let (key_s, crt_s) = (key.display().to_string(), crt.display().to_string());
    let (ca_crt_s, ca_key_s) = (ca_crt.display().to_string(), ca_key.display().to_string());
    args.extend_from_slice(&[
        "-keyout", &key_s, "-out", &crt_s, "-CA", &ca_crt_s, "-CAkey", &ca_key_s,
    ]);
    openssl(stem, &args)
}

/// Creates the whole PKI in `dir` (which must exist).
pub fn generate(dir: &Path, family: IpFamily) -> Result<Pki, CertError> {
    let pki = Pki {
        dir: dir.to_path_buf(),
    };
    let ca_cfg = dir.join("ca.cnf");
    write(
        &ca_cfg,
        "[req]\ndistinguished_name = dn\n[dn]\n[ext]\nbasicConstraints = critical,CA:TRUE\n\
         keyUsage = critical,keyCertSign,cRLSign,digitalSignature\nsubjectKeyIdentifier = hash\n",
    )?;
    let (ca_key, ca_crt, ca_cfg) = (
        pki.ca_key().display().to_string(),
        pki.ca_cert().display().to_string(),
        ca_cfg.display().to_string(),
    );
    let mut args = vec![
        "req",
        "-x509",
        "-nodes",
        "-days",
        "3650",
        "-subj",
        "/CN=ferrolb-lab-ca",
        "-config",
        &ca_cfg,
        "-extensions",
        "ext",
    ];
    args.extend_from_slice(&EC);
    args.extend_from_slice(&["-keyout", &ca_key, "-out", &ca_crt]);
    openssl("ca", &args)?;

    issue(
        &pki,
        "apiserver",
        "/CN=kube-apiserver",
        &leaf_config("serverAuth", Some(&apiserver_sans(family))),
    )?;
    for (stem, cn, org) in CLIENTS {
        let subject = match org {
            Some(o) => format!("/O={o}/CN={cn}"),
            None => format!("/CN={cn}"),
        };
        issue(&pki, stem, &subject, &leaf_config("clientAuth", None))?;
    }

    let (sa_key, sa_pub) = (
        pki.sa_key().display().to_string(),
        pki.sa_pub().display().to_string(),
    );
    openssl(
        "sa key",
        &[
            "genpkey",
            "-algorithm",
            "EC",
            "-pkeyopt",
            "ec_paramgen_curve:P-256",
            "-out",
            &sa_key,
        ],
    )?;
    openssl(
        "sa pub",
        &["pkey", "-in", &sa_key, "-pubout", "-out", &sa_pub],
    )?;
    Ok(pki)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sans_cover_every_address_clients_use() {
        let s = apiserver_sans(IpFamily::Dual);
        for want in [
            "IP:198.18.0.1",
            "IP:198.18.64.1",
            "IP:2001:db8::1",
            "IP:2001:db8:2::1",
            "DNS:kubernetes.default.svc",
        ] {
            assert!(s.iter().any(|x| x == want), "{want} missing from {s:?}");
        }
        assert!(
            !apiserver_sans(IpFamily::Ipv4)
                .iter()
                .any(|x| x.contains("2001"))
        );
    }

    #[test]
    fn generated_certificates_verify_against_the_ca() {
        let dir = std::env::temp_dir().join(format!("ferrolb-lab-pki-{}", std::process::id()));
        fs::create_dir_all(&dir).unwrap();
        let pki = generate(&dir, IpFamily::Ipv4).expect("openssl must be installed for the lab");
        for stem in ["apiserver", "admin", "kube-proxy"] {
            let out = Command::new("openssl")
                .args(["verify", "-CAfile"])
                .arg(pki.ca_cert())
                .arg(pki.cert(stem))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{stem}: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        let subject = Command::new("openssl")
            .args(["x509", "-noout", "-subject", "-in"])
            .arg(pki.cert("admin"))
            .output()
            .unwrap();
        assert!(String::from_utf8_lossy(&subject.stdout).contains("system:masters"));
        assert!(pki.sa_pub().exists());
        fs::remove_dir_all(dir).unwrap();
    }
}
