//! Shared builders for the router's tests.
#![allow(dead_code)]

use swarm_router::{Coord, Link, PeerInfo, PeerKey, PeerState, SwarmView, Workload};

/// 128 tokens x 256 hidden, raw f32: 128 KiB per activation.
pub(crate) const WL: Workload = Workload {
    tokens: 128,
    hidden: 256,
    codec_ratio: 1.0,
};

pub(crate) fn key(i: u8) -> PeerKey {
    PeerKey([i; 32])
}

pub(crate) fn mbit(x: f64) -> f64 {
    x * 1e6 / 8.0
}

pub(crate) fn link(up_mbit: f64, down_mbit: f64) -> Link {
    Link {
        up_bytes_per_s: mbit(up_mbit),
        down_bytes_per_s: mbit(down_mbit),
        coord: Coord::default(),
    }
}

/// A serving peer on `stages` with `compute` tokens/s and a symmetric link.
pub(crate) fn peer(stages: std::ops::Range<u16>, compute: f64, link_mbit: f64) -> PeerInfo {
    PeerInfo {
        stages,
        compute_tokens_per_s: compute,
        link: link(link_mbit, link_mbit),
        state: PeerState::Serving,
    }
}

pub(crate) fn view(stages: u16) -> SwarmView {
    SwarmView::new(stages, WL).expect("valid view")
}

pub(crate) fn client() -> swarm_router::PlanRequest {
    swarm_router::PlanRequest {
        workload: WL,
        client: link(1000.0, 1000.0),
    }
}
