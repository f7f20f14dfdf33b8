//! Helpers shared by the lab test binaries.
#![allow(dead_code)]

use std::path::Path;
use std::process::{ExitCode, Output};
use std::time::{Duration, Instant};

use anyhow::{Result, bail};
use ferrolb_lab::lab::{Lab, LabEnvironment};
use ferrolb_lab::state::UpOptions;
use libtest_mimic::{Arguments, Trial};

pub fn exe() -> &'static Path {
    Path::new(env!("CARGO_BIN_EXE_ferrolb-lab"))
}

/// Brings a lab up under `prefix`, or returns `None` when FERROLB_SKIP_LAB=1
/// and the lab cannot run here (saying so). Without that variable a machine
/// that cannot run the lab fails the test with the reason.
pub fn up(prefix: &str, opts: &UpOptions) -> Result<Option<Lab>> {
    if let LabEnvironment::Skip(why) = LabEnvironment::check() {
        eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): {why}");
        return Ok(None);
    }
    // A crashed earlier run of this binary may have left its lab behind.
    if let Ok(old) = Lab::attach(exe(), prefix) {
        let _ = old.down();
    }
    match Lab::up(exe(), prefix, opts) {
        Ok(lab) => Ok(Some(lab)),
        // Bringing the lab up is not what these tests test; one more try
        // after a failure, which is printed in full either way.
        Err(first) => {
            eprintln!("[test] the lab did not come up on the first try: {first:#}");
            eprintln!("[test] taking down what is left and trying once more");
            if let Ok(old) = Lab::attach(exe(), prefix) {
                let _ = old.down();
            }
            let lab = Lab::up(exe(), prefix, opts)
                .map_err(|e| e.context(format!("second try (the first: {first:#})")))?;
            Ok(Some(lab))
        }
    }
}

/// Runs `body` against `lab` and always takes the lab down afterwards.
/// On failure the lab's logs are copied to /tmp/ferrolb-test-logs/<prefix>
/// first, since `down` removes them.
pub fn with_lab(lab: Lab, body: impl FnOnce(&Lab) -> Result<()>) -> Result<()> {
    let result = body(&lab);
    if result.is_err() {
        lab.keep_logs();
    }
    let down = lab.down();
    result.and(down)
}

/// Runs a `ferrolb-lab` subcommand that must succeed; returns its stdout.
pub fn cli_ok(lab: &Lab, args: &[&str]) -> Result<String> {
    let out = lab.cli(args)?;
    anyhow::ensure!(
        out.status.success(),
        "ferrolb-lab {}: {}",
        args.join(" "),
        both(&out)
    );
    Ok(text(&out.stdout))
}

pub fn step(name: &str) -> Instant {
    eprintln!("\n=== step: {name}");
    Instant::now()
}

pub fn done(t: Instant) {
    eprintln!("    ok ({:.1}s)", t.elapsed().as_secs_f64());
}

pub fn text(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

pub fn both(o: &Output) -> String {
    format!("{}{}", text(&o.stdout), text(&o.stderr))
}

/// Polls `f` every 250 ms until it returns true, printing progress every
/// 10 s; fails after `timeout` with the last error.
pub fn wait_until(
    what: &str,
    timeout: Duration,
    mut f: impl FnMut() -> Result<bool>,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last_note = Instant::now();
    loop {
        match f() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => {}
            Err(e) if start.elapsed() > timeout => {
                return Err(e.context(format!("waiting for {what}")));
            }
            Err(_) => {}
        }
        if start.elapsed() > timeout {
            bail!("timed out after {}s waiting for {what}", timeout.as_secs());
        }
        if last_note.elapsed() > Duration::from_secs(10) {
            eprintln!(
                "    still waiting for {what} ({}s)",
                start.elapsed().as_secs()
            );
            last_note = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// One named lab test: a function of the shared lab.
pub type LabTest = fn(&Lab) -> Result<()>;

/// Runs named tests one after another against one lab, like `cargo test`
/// does (filters, `--list`, `--exact`, a line per test), so one failure
/// never hides the others. The lab comes up once, `setup` prepares what
/// every test shares, and the lab goes down at the end; logs of a failed
/// run are kept in /tmp/ferrolb-test-logs/<prefix>.
pub fn run_lab_tests(
    prefix: &str,
    opts: &UpOptions,
    setup: LabTest,
    tests: &[(&'static str, LabTest)],
) -> ExitCode {
    let mut args = Arguments::from_args();
    // The tests share one lab (and the machine's lab addresses).
    args.test_threads = Some(1);
    let probe = |name: &str| Trial::test(name.to_string(), || Ok(()));
    let runs = tests.iter().any(|(name, _)| {
        let t = probe(name);
        !args.is_filtered_out(&t) && !args.is_ignored(&t)
    });
    if args.list || !runs {
        let trials = tests.iter().map(|(name, _)| probe(name)).collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    if let LabEnvironment::Skip(why) = LabEnvironment::check() {
        eprintln!("SKIPPED on purpose (FERROLB_SKIP_LAB=1): {why}");
        let trials = tests
            .iter()
            .map(|(name, _)| probe(name).with_ignored_flag(true))
            .collect();
        return libtest_mimic::run(&args, trials).exit_code();
    }
    let lab = match up(prefix, opts).and_then(|lab| lab.ok_or_else(|| anyhow::anyhow!("no lab"))) {
        Ok(lab) => lab,
        Err(e) => {
            eprintln!("the lab did not come up: {e:#}");
            let why = format!("the lab did not come up: {e:#}");
            let trials = tests
                .iter()
                .map(|(name, _)| {
                    let why = why.clone();
                    Trial::test(name.to_string(), move || Err(why.into()))
                })
                .collect();
            return libtest_mimic::run(&args, trials).exit_code();
        }
    };
    let lab: &'static Lab = Box::leak(Box::new(lab));
    let prepared = setup(lab).map_err(|e| format!("{e:#}"));
    let trials = tests
        .iter()
        .map(|(name, test)| {
            let (test, prepared) = (*test, prepared.clone());
            Trial::test(name.to_string(), move || {
                prepared.map_err(|e| format!("setup failed: {e}"))?;
                let t = Instant::now();
                let result = test(lab).map_err(|e| format!("{e:#}").into());
                eprintln!("    ({:.1}s)", t.elapsed().as_secs_f64());
                result
            })
        })
        .collect();
    let conclusion = libtest_mimic::run(&args, trials);
    if conclusion.has_failed() {
        lab.keep_logs();
    }
    if let Err(e) = lab.down() {
        eprintln!("taking the lab down failed: {e:#}");
        return ExitCode::FAILURE;
    }
    conclusion.exit_code()
}

/// `annotations:` for a manifest's metadata (two-space indent), or nothing
/// when there are none.
pub fn annotations_yaml(annotations: &[(&str, &str)]) -> String {
    if annotations.is_empty() {
        return String::new();
    }
    let entries: String = annotations
        .iter()
        .map(|(k, v)| format!("    {k}: \"{v}\"\n"))
        .collect();
    format!("  annotations:\n{entries}")
}
