//! Running the cached kubectl against the lab (apply, tokens, readiness).

use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

#[derive(Debug, thiserror::Error)]
pub enum KubectlError {
    #[error("cannot run {0}: {1}")]
    Run(String, std::io::Error),
    #[error("kubectl {args} failed: {stderr}")]
    Failed { args: String, stderr: String },
}

#[derive(Clone, Debug)]
pub struct Kubectl {
    pub bin: PathBuf,
    pub kubeconfig: PathBuf,
}

impl Kubectl {
    pub fn new(bin_dir: &Path, kubeconfig: &Path) -> Self {
        Kubectl {
            bin: bin_dir.join("kubectl"),
            kubeconfig: kubeconfig.to_path_buf(),
        }
    }

    /// Runs kubectl and returns its output whatever the exit status.
    pub fn output(&self, args: &[&str], stdin: Option<&str>) -> Result<Output, KubectlError> {
        let mut cmd = Command::new(&self.bin);
        cmd.arg("--kubeconfig").arg(&self.kubeconfig).args(args);
        cmd.stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
        let mut child = cmd
            .spawn()
            .map_err(|e| KubectlError::Run(self.bin.display().to_string(), e))?;
        // Feed stdin from its own thread while this one drains stdout and
        // stderr: kubectl may answer before it has read all its input, and
        // a full pipe in either direction must never deadlock the two.
        let feeder = match (stdin, child.stdin.take()) {
            (Some(input), Some(mut pipe)) => {
                let input = input.to_string();
                Some(std::thread::spawn(move || pipe.write_all(input.as_bytes())))
            }
            _ => None,
        };
        let out = child
            .wait_with_output()
            .map_err(|e| KubectlError::Run(self.bin.display().to_string(), e))?;
        if let Some(Ok(Err(e))) = feeder.map(|f| f.join()) {
            // kubectl exiting before reading everything is its own error,
            // reported through its exit status; only other failures count.
            if e.kind() != std::io::ErrorKind::BrokenPipe {
                return Err(KubectlError::Run("kubectl stdin".into(), e));
            }
        }
        Ok(out)
    }

    /// Runs kubectl and returns stdout, or an error with its stderr.
    pub fn run(&self, args: &[&str], stdin: Option<&str>) -> Result<String, KubectlError> {
        let out = self.output(args, stdin)?;
        if out.status.success() {
            Ok(String::from_utf8_lossy(&out.stdout).into_owned())
        } else {
            Err(KubectlError::Failed {
                args: args.join(" "),
                stderr: String::from_utf8_lossy(&out.stderr).trim().to_string(),
            })
        }
    }

    pub fn apply(&self, manifest: &str) -> Result<String, KubectlError> {
        self.run(
            &["apply", "--server-side", "--force-conflicts", "-f", "-"],
            Some(manifest),
        )
    }

    /// Applies CRD manifests server-side and waits until each is
    /// Established, so the API serves their kinds when this returns.
    pub fn apply_crds(&self, files: &[std::path::PathBuf]) -> Result<(), KubectlError> {
        for f in files {
            let p = f.display().to_string();
            self.run(
                &["apply", "--server-side", "--force-conflicts", "-f", &p],
                None,
            )?;
        }
        for f in files {
            let p = f.display().to_string();
            self.run(
                &[
                    "wait",
                    "--for=condition=Established",
                    "--timeout=30s",
                    "-f",
                    &p,
                ],
                None,
            )?;
        }
        Ok(())
    }

    /// True once the API server answers /readyz with ok.
    pub fn ready(&self) -> bool {
        self.run(&["get", "--raw", "/readyz", "--request-timeout=2s"], None)
            .is_ok_and(|s| s.trim() == "ok")
    }
}
