//! Benchmarks that compare FerroLB with the peer a user would pick
//! instead, printed as tables (`ferrolb-bench`). Not tests: the figures go
//! in issue notes.

pub mod layout;
pub mod proxy;
pub mod proxy_core;
pub mod speaker;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

/// Resident memory of process `pid` ("self" for this one), in KiB.
pub fn rss_kib(pid: &str) -> Option<u64> {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()?
        .lines()
        .find(|l| l.starts_with("VmRSS:"))?
        .split_whitespace()
        .nth(1)?
        .parse()
        .ok()
}

/// A progress line on stderr.
pub fn say(msg: &str) {
    eprintln!("[bench] {msg}");
}

/// Says every 10 s that `what` is still running, until dropped.
pub struct Ticker {
    stop: Arc<AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Ticker {
    pub fn start(what: &str) -> Self {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let what = what.to_string();
        let thread = std::thread::spawn(move || {
            let started = Instant::now();
            let mut next = Duration::from_secs(10);
            while !flag.load(Ordering::Relaxed) {
                if started.elapsed() >= next {
                    say(&format!("still {what} ({}s)", started.elapsed().as_secs()));
                    next += Duration::from_secs(10);
                }
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        Self {
            stop,
            thread: Some(thread),
        }
    }
}

impl Drop for Ticker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// A Markdown table with a title.
pub struct Table {
    title: String,
    header: Vec<String>,
    rows: Vec<Vec<String>>,
}

impl Table {
    pub fn new(title: &str, header: &[&str]) -> Self {
        Self {
            title: title.to_string(),
            header: header.iter().map(|h| h.to_string()).collect(),
            rows: Vec::new(),
        }
    }

    pub fn row(&mut self, cells: &[String]) {
        self.rows.push(cells.to_vec());
    }

    pub fn print(&self) {
        println!("\n{}", self.title);
        println!("| {} |", self.header.join(" | "));
        println!("|{}", "---|".repeat(self.header.len()));
        for r in &self.rows {
            println!("| {} |", r.join(" | "));
        }
    }
}
