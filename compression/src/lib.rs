//! Codecs for tensors on the wire: `&[f32]` in, framed bytes out, and back.
//!
//! Knows nothing of candle, tokio or sockets (see ARCHITECTURE.md).
