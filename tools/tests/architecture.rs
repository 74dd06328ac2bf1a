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
