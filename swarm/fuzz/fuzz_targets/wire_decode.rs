//! Fuzzes the wire protocol: envelope parsing, every registered message decoder, and the
//! primitive reads. Nothing may panic; whatever decodes must re-encode to the same bytes
//! (canonical encodings), so a decoder cannot accept what an encoder would never write.

#![no_main]

use libfuzzer_sys::fuzz_target;
use swarm_core::wire::{self, HEADER_LEN, Header, Reader, WireMessage, kind};
use swarm_core::{membership as m, nat as n, protocol as p, relay as rl, rpc as r};

/// Decodes `body` as `M`; if it decodes, its encoding must be exactly `body`.
fn check<M: WireMessage>(body: &[u8]) {
    if let Ok(msg) = wire::decode_body::<M>(body) {
        let again = wire::encode_body(&msg).expect("a decoded message re-encodes");
        assert_eq!(
            again,
            body,
            "non-canonical encoding accepted for kind {}",
            M::KIND
        );
    }
}

/// Every message type we know, by kind. Kinds not listed still go through envelope parsing.
fn decode_kind(k: u16, body: &[u8]) {
    match k {
        kind::PING => check::<r::Ping>(body),
        kind::PONG => check::<r::Pong>(body),
        kind::ERROR => check::<r::RemoteError>(body),
        kind::BULK => check::<r::Bulk>(body),
        kind::BULK_ACK => check::<r::BulkAck>(body),
        kind::GOSSIP => check::<m::GossipPush>(body),
        kind::GOSSIP_REPLY => check::<m::GossipReply>(body),
        kind::JOIN => check::<m::JoinRequest>(body),
        kind::JOIN_REPLY => check::<m::JoinReply>(body),
        kind::STATUS => check::<m::StatusRequest>(body),
        kind::STATUS_REPLY => check::<m::StatusReply>(body),
        kind::DIAL_BACK => check::<n::DialBackRequest>(body),
        kind::DIAL_BACK_REPLY => check::<n::DialBackReply>(body),
        kind::OBSERVE => check::<n::ObserveRequest>(body),
        kind::OBSERVE_REPLY => check::<n::ObserveReply>(body),
        kind::PUNCH_REQUEST => check::<n::PunchRequest>(body),
        kind::PUNCH_PLAN => check::<n::PunchPlan>(body),
        kind::PUNCH_START => check::<n::PunchStart>(body),
        kind::PUNCH_STARTED => check::<n::PunchStarted>(body),
        kind::RELAY => check::<rl::RelayOpen>(body),
        kind::RELAY_ACCEPTED => check::<rl::RelayAccepted>(body),
        kind::FORWARD => check::<p::Forward>(body),
        kind::FORWARD_OUT => check::<p::ForwardOut>(body),
        kind::BACKWARD => check::<p::Backward>(body),
        kind::BACKWARD_OUT => check::<p::BackwardOut>(body),
        kind::COUNTED => check::<p::Counted>(body),
        kind::HOP_FAILED => check::<p::HopFailed>(body),
        kind::ABANDON => check::<p::Abandon>(body),
        kind::ACK => check::<p::Ack>(body),
        kind::RUN_INFO => check::<p::RunInfoRequest>(body),
        kind::RUN_INFO_REPLY => check::<p::RunInfo>(body),
        kind::ADMIT => check::<p::Admit>(body),
        kind::ADMIT_REPLY => check::<p::AdmitReply>(body),
        kind::READY => check::<p::Ready>(body),
        kind::LEAVE => check::<p::Leave>(body),
        kind::LEAVE_REPLY => check::<p::LeaveReply>(body),
        kind::SYNC_START => check::<p::SyncStart>(body),
        kind::GRAD_SHARE => check::<p::GradShare>(body),
        kind::SYNC_DONE => check::<p::SyncDone>(body),
        kind::APPLY => check::<p::Apply>(body),
        kind::APPLIED => check::<p::Applied>(body),
        kind::FETCH_STATE => check::<p::FetchState>(body),
        kind::STATE_CHUNK => check::<p::StateChunk>(body),
        kind::RELOAD => check::<p::Reload>(body),
        _ => {}
    }
}

/// Interprets the input as a program of primitive reads with hostile caps.
fn primitives(data: &[u8]) {
    let Some((&ops, rest)) = data.split_first() else {
        return;
    };
    let mut r = Reader::new(rest);
    for i in 0..16 {
        let op = (ops.rotate_left(i) ^ i as u8) % 9;
        let ok = match op {
            0 => r.u8().is_ok(),
            1 => r.u32().is_ok(),
            2 => r.varint().is_ok(),
            3 => r.bool().is_ok(),
            4 => r
                .bytes("b", 1 << 20)
                .map(|b| b.len() <= 1 << 20)
                .unwrap_or(true),
            5 => r.str("s", 64).map(|s| s.len() <= 64).unwrap_or(true),
            6 => r.f32s("f", usize::MAX).is_ok(),
            7 => r.len("n", usize::MAX, 0).is_ok(),
            _ => r.array::<7>().is_ok(),
        };
        if !ok {
            break;
        }
    }
    let _ = r.finish();
}

fuzz_target!(|data: &[u8]| {
    let kinds = wire::registry();
    // A whole envelope, as a peer would send it.
    if let Ok((header, body)) = wire::split_envelope(data, &kinds) {
        assert!(header.body_len as usize == body.len());
        assert!(body.len() <= kinds.info(header.kind).unwrap().max_len);
        decode_kind(header.kind, body);
    }
    if let Ok(head) = <[u8; HEADER_LEN]>::try_from(data.get(..HEADER_LEN).unwrap_or(&[])) {
        let _ = Header::parse(&head, |k| kinds.info(k));
    }
    // The body decoders directly, with the kind chosen by the first two bytes.
    if data.len() >= 2 {
        let k = u16::from_le_bytes([data[0], data[1]]) % 80;
        decode_kind(k, &data[2..]);
    }
    primitives(data);
});
