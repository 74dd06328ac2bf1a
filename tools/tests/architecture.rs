//! The crate boundaries of ARCHITECTURE.md, checked from the manifests: a dependency that crosses a
//! boundary fails here rather than in review.

use std::path::{Path, PathBuf};

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// All dependency names (normal, dev and build) of the crate in `folder`.
fn deps(folder: &str) -> Vec<String> {
    let path = workspace_root().join(folder).join("Cargo.toml");
    let text = std::fs::read_to_string(&path).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    let mut names = Vec::new();
    for section in ["dependencies", "build-dependencies"] {
        if let Some(t) = manifest.get(section).and_then(|v| v.as_table()) {
            names.extend(t.keys().cloned());
        }
    }
    names
}

fn assert_absent(folder: &str, forbidden: &[&str]) {
    let deps = deps(folder);
    for f in forbidden {
        assert!(
            !deps
                .iter()
                .any(|d| d == f || d.starts_with(&format!("{f}-"))),
            "{folder}/ must not depend on {f} (found in {deps:?})"
        );
    }
}

#[test]
fn workspace_members_are_the_product_folders() {
    let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
    let manifest: toml::Table = toml::from_str(&text).unwrap();
    let members: Vec<&str> = manifest["workspace"]["members"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_str().unwrap())
        .collect();
    for folder in ["compression", "model", "router", "swarm", "tools"] {
        assert!(members.contains(&folder), "workspace lacks {folder}");
    }
}

#[test]
fn compression_knows_no_candle_tokio_or_sockets() {
    assert_absent(
        "compression",
        &["candle", "tokio", "quinn", "rustls", "swarm", "socket2"],
    );
}

#[test]
fn router_is_pure() {
    assert_absent(
        "router",
        &[
            "candle", "tokio", "quinn", "rustls", "swarm", "socket2", "futures",
        ],
    );
}

#[test]
fn nat_traversal_logic_is_sans_io() {
    assert_absent(
        "swarm/nat",
        &[
            "candle", "tokio", "quinn", "rustls", "swarm", "socket2", "futures", "libc",
        ],
    );
}

#[test]
fn model_knows_no_peers_network_or_codecs() {
    assert_absent(
        "model",
        &[
            "tokio", "quinn", "rustls", "swarm", "socket2", "zstd", "futures",
        ],
    );
}

#[test]
fn library_crates_use_thiserror_not_anyhow() {
    for folder in [
        "compression",
        "model",
        "router",
        "swarm",
        "swarm/bench",
        "swarm/nat",
        "swarm/net",
        "swarm/netlab",
    ] {
        assert_absent(folder, &["anyhow"]);
    }
}

#[test]
fn only_swarm_and_tools_join_the_library_crates() {
    let swarm = deps("swarm");
    for lib in ["swarm-compression", "swarm-model", "swarm-router"] {
        assert!(swarm.iter().any(|d| d == lib), "swarm/ should use {lib}");
    }
}

#[test]
fn the_monitor_reads_the_snapshot_and_swarm_knows_no_http() {
    assert_absent(
        "swarm/monitor",
        &[
            "candle",
            "quinn",
            "rustls",
            "swarm-model",
            "swarm-router",
            "anyhow",
        ],
    );
    assert_absent("swarm", &["axum", "hyper", "prometheus"]);
}

#[test]
fn the_network_crate_knows_no_training_codecs_candle_or_audits() {
    assert_absent(
        "swarm/net",
        &[
            "candle",
            "swarm-core",
            "swarm-model",
            "swarm-compression",
            "swarm-router",
            "swarm-monitor",
            "safetensors",
            "zstd",
            "half",
            "serde_json",
        ],
    );
    let members = {
        let text = std::fs::read_to_string(workspace_root().join("Cargo.toml")).unwrap();
        let manifest: toml::Table = toml::from_str(&text).unwrap();
        manifest["workspace"]["members"].clone()
    };
    assert!(
        members
            .as_array()
            .unwrap()
            .iter()
            .any(|m| m.as_str() == Some("swarm/net")),
        "swarm/net is a workspace member"
    );
}

/// Every `.rs` file under `dir`, recursively (skipping build output).
fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(dir) else {
        return;
    };
    for e in entries {
        let path = e.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if path.is_dir() {
            if name != "target" && !name.starts_with('.') {
                rust_files(&path, out);
            }
        } else if name.ends_with(".rs") {
            out.push(path);
        }
    }
}

/// A test file: in a `tests/` folder or a module file named `tests.rs`.
fn is_test_file(path: &Path) -> bool {
    path.file_name().is_some_and(|n| n == "tests.rs")
        || path.components().any(|c| c.as_os_str() == "tests")
}

#[test]
fn no_source_file_reaches_1200_lines() {
    let root = workspace_root();
    let mut files = Vec::new();
    rust_files(&root, &mut files);
    assert!(files.len() > 50, "found only {} files", files.len());
    let mut long = Vec::new();
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let lines = std::fs::read_to_string(f).unwrap().lines().count();
        if lines >= 1200 {
            long.push(format!(
                "{} ({lines} lines)",
                f.strip_prefix(&root).unwrap().display()
            ));
        }
    }
    assert!(long.is_empty(), "split these into modules: {long:?}");
}

/// The `crate::NAME` module paths that the source files of `files` mention (in `use` lines and in
/// qualified paths), with the file that mentions each.
fn crate_modules_used(files: &[PathBuf]) -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for f in files {
        let text = std::fs::read_to_string(f).unwrap();
        for line in text.lines() {
            let code = line.split("//").next().unwrap();
            let mut rest = code;
            while let Some(i) = rest.find("crate::") {
                let after = &rest[i + "crate::".len()..];
                let name: String = after
                    .chars()
                    .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
                    .collect();
                out.push((name, f.clone()));
                rest = after;
            }
        }
    }
    out
}

fn module_files(paths: &[&str]) -> Vec<PathBuf> {
    let root = workspace_root();
    let mut files = Vec::new();
    for p in paths {
        let path = root.join(p);
        if path.is_dir() {
            rust_files(&path, &mut files);
        } else {
            assert!(
                path.exists(),
                "{p} is gone: update this test and ARCHITECTURE.md"
            );
            files.push(path);
        }
    }
    files
}

/// Training (pipeline messages, stage worker, trainer) imports proof of training (receipts,
/// ledger), never the reverse; both use the shared ids below them (`ids.rs`).
#[test]
fn proof_of_training_does_not_import_training() {
    let training = [
        "protocol",
        "stage",
        "trainer",
        "state_transfer",
        "compute",
        "stage_fit",
    ];
    let proof = module_files(&["swarm/src/receipt.rs", "swarm/src/ledger.rs"]);
    for (m, f) in crate_modules_used(&proof) {
        assert!(
            !training.contains(&m.as_str()),
            "{} (proof of training) imports crate::{m} (training)",
            f.display()
        );
    }
    let ids = module_files(&["swarm/src/ids.rs"]);
    for (m, f) in crate_modules_used(&ids) {
        assert!(
            !training.contains(&m.as_str()) && m != "receipt" && m != "ledger",
            "{} (shared ids) imports crate::{m}",
            f.display()
        );
    }
}

/// The trainer reaches the stage worker only through its public API: audit recomputation goes
/// through `compute`, never into `stage::audit`.
#[test]
fn the_trainer_does_not_reach_into_stage_internals() {
    for f in module_files(&["swarm/src/trainer", "swarm/src/trainer.rs"]) {
        let text = std::fs::read_to_string(&f).unwrap();
        assert!(
            !text.contains("stage::audit"),
            "{} reaches into stage::audit",
            f.display()
        );
    }
}

/// The network crate's sources name no upper layer (its manifest cannot, see above; this catches
/// a path that leaks in through a re-export or a macro).
#[test]
fn the_network_crate_sources_name_no_upper_layer() {
    let files = module_files(&["swarm/net/src"]);
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        for word in [
            "swarm_core",
            "swarm_model",
            "swarm_compression",
            "candle",
            "receipt::",
            "protocol::",
        ] {
            assert!(!text.contains(word), "{} mentions {word}", f.display());
        }
    }
}

/// The decisions of a step are sans-IO (issue #16): the trainer's `machine` modules do no I/O,
/// read no clock and draw no randomness; time comes in as an argument (comments aside: they
/// may name what they are modelled on). (Their tests, in
/// `tests.rs` files or an inline `mod tests` at the end, start a virtual clock from a real
/// `Instant`.)
#[test]
fn the_step_machine_is_sans_io() {
    let files = module_files(&["swarm/src/trainer/machine.rs", "swarm/src/trainer/machine"]);
    assert!(files.len() >= 3, "{files:?}");
    for f in files.iter().filter(|f| !is_test_file(f)) {
        let text = std::fs::read_to_string(f).unwrap();
        let code: String = text
            .split("#[cfg(test)]\nmod tests {")
            .next()
            .unwrap()
            .lines()
            .map(|l| l.split("//").next().unwrap())
            .collect::<Vec<_>>()
            .join("\n");
        for word in [
            "tokio",
            "quinn",
            "std::net",
            "std::fs",
            "Instant::now",
            "SystemTime",
            "rand::",
            "thread_rng",
            "async ",
            ".await",
            "Mutex",
        ] {
            assert!(!code.contains(word), "{} uses {word}", f.display());
        }
    }
}

/// Library crates whose every public item is documented (`#![warn(missing_docs)]` at the
/// crate root).
const DOCUMENTED: &[&str] = &[
    "compression",
    "model",
    "router",
    "swarm",
    "swarm/bench",
    "swarm/monitor",
    "swarm/nat",
    "swarm/net",
    "swarm/netlab",
    "swarm/testkit",
];

/// `pub` marks what other crates reach (`unreachable_pub` in `[workspace.lints]`, which every
/// crate takes), every public item of the library crates says what it is for, and no source
/// allows either lint away.
#[test]
fn library_crates_document_their_api_and_allow_no_lint_away() {
    let root = workspace_root();
    let ws: toml::Table =
        toml::from_str(&std::fs::read_to_string(root.join("Cargo.toml")).unwrap()).unwrap();
    assert_eq!(
        ws["workspace"]["lints"]["rust"]["unreachable_pub"].as_str(),
        Some("warn")
    );
    let members = ws["workspace"]["members"].as_array().unwrap();
    for m in members {
        let folder = m.as_str().unwrap();
        let manifest: toml::Table =
            toml::from_str(&std::fs::read_to_string(root.join(folder).join("Cargo.toml")).unwrap())
                .unwrap();
        assert_eq!(
            manifest.get("lints").and_then(|l| l.get("workspace")),
            Some(&toml::Value::Boolean(true)),
            "{folder}/Cargo.toml must take [workspace.lints]"
        );
        let mut files = Vec::new();
        rust_files(&root.join(folder), &mut files);
        for f in files {
            let text = std::fs::read_to_string(&f).unwrap();
            for lint in ["unreachable_pub", "missing_docs"] {
                assert!(
                    !text.contains(&format!("allow({lint}")),
                    "{} allows {lint} away",
                    f.display()
                );
            }
        }
    }
    for folder in DOCUMENTED {
        let lib = std::fs::read_to_string(root.join(folder).join("src/lib.rs")).unwrap();
        assert!(
            lib.contains("#![warn(missing_docs)]"),
            "{folder}/src/lib.rs must warn on missing docs"
        );
    }
}
