#![warn(missing_docs)]
//! The model: Llama-style decoder split into pieces (embedding, stages, head), each with forward and
//! VJP backward, plus optimizer, checkpoints, tokenizer and data. Knows nothing of peers or codecs.

pub mod checkpoint;
pub mod checkpoint_eval;
pub mod config;
pub mod data;
mod ends;
pub mod error;
mod layer;
pub mod llama2c;
pub mod model;
pub mod ops;
pub mod optim;
pub mod prepare;
pub mod presets;
pub mod profile;
pub mod run;
pub mod shard;
pub mod shards;
pub mod subspace;
pub mod tokenizer;
pub mod tokenizer_bpe;
pub mod train;

pub use config::ModelConfig;
pub use data::{Batch, Corpus};
pub use error::{Error, Result};
pub use model::Model;
pub use optim::{AdamW, LrSchedule, clip_scale};
pub use run::{CodecConfig, RunConfig, SyncConfig, SyncMode};
pub use shard::{ForwardCtx, Piece, Shard};
pub use tokenizer::{ByteTokenizer, Tokenizer};
pub use train::{LocalTrainer, StepStats};
