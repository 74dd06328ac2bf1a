//! Headless Chromium for the monitor's tests: found on PATH (or `SWARM_CHROMIUM`), run with the
//! flags that keep it off the network, in a given profile, bounded in time.

#![allow(dead_code)] // Each test file uses a different subset.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Chromium's path, or `None` where it is not installed.
pub(crate) fn chromium() -> Option<PathBuf> {
    if let Some(p) = std::env::var_os("SWARM_CHROMIUM") {
        return Some(PathBuf::from(p));
    }
    ["chromium", "chromium-browser", "google-chrome"]
        .iter()
        .flat_map(|n| {
            std::env::var_os("PATH")
                .map(|p| {
                    std::env::split_paths(&p)
                        .map(|d| d.join(n))
                        .collect::<Vec<_>>()
                })
                .unwrap_or_default()
        })
        .find(|p| p.is_file())
}

/// Runs headless Chromium (`cmd`, e.g. `Command::new(chrome)` or one that enters a network
/// namespace first) on `url` and returns its stdout.
pub(crate) fn browse_with(mut cmd: Command, profile: &Path, extra: &[String], url: &str) -> String {
    let mut child = cmd
        .args([
            "--headless",
            "--no-sandbox",
            "--disable-gpu",
            "--disable-quic",
            "--disable-background-networking",
            "--disable-component-update",
            "--disable-sync",
            "--no-first-run",
            "--disable-dev-shm-usage",
            "--virtual-time-budget=4000",
        ])
        .arg(format!("--user-data-dir={}", profile.display()))
        .args(extra)
        .arg(url)
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .expect("start chromium");
    let mut out = String::new();
    let mut stdout = child.stdout.take().unwrap();
    let reader = std::thread::spawn(move || {
        let _ = stdout.read_to_string(&mut out);
        out
    });
    let start = Instant::now();
    loop {
        if child.try_wait().unwrap().is_some() {
            break;
        }
        if start.elapsed() > Duration::from_secs(90) {
            let _ = child.kill();
            let _ = child.wait();
            panic!("chromium did not finish in 90 s");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    reader.join().unwrap()
}

/// [`browse_with`] Chromium at `chrome`.
pub(crate) fn browse(chrome: &Path, profile: &Path, extra: &[String], url: &str) -> String {
    browse_with(Command::new(chrome), profile, extra, url)
}

/// The page's DOM after its scripts ran.
pub(crate) fn dump_dom(chrome: &Path, profile: &Path, url: &str) -> String {
    browse(chrome, profile, &["--dump-dom".into()], url)
}

/// The DOM element of the page's peer row for `id` (`<tr ... data-peer="ID" ...>`), as text.
pub(crate) fn peer_row<'a>(dom: &'a str, id: &str) -> Option<&'a str> {
    // The coverage panel tags its replica lines with the same attribute: take the table row.
    dom.match_indices(&format!("data-peer=\"{id}\""))
        .filter_map(|(at, _)| {
            let start = dom[..at].rfind('<')?;
            let end = at + dom[at..].find('>')?;
            Some(&dom[start..=end])
        })
        .find(|tag| tag.starts_with("<tr"))
}
