//! The model: Llama-style decoder split into pieces (embedding, stages, head), each with forward and
//! VJP backward, plus optimizer, checkpoints, tokenizer and data. Knows nothing of peers or codecs.

pub mod config;
pub mod error;

pub use config::ModelConfig;
pub use error::{Error, Result};
