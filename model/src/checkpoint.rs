//! Checkpoints in Hugging Face Llama format: a directory with `config.json` and `model.safetensors`
//! (or shards listed in `model.safetensors.index.json`), which `transformers` and
//! candle-transformers' `llama::Llama` load unchanged. Training state (step and AdamW moments) sits
//! beside it in `optimizer.safetensors` and `train_state.json`, so a run resumes exactly.
//!
//! A subspace model (`subspace_rank > 0`) is saved as the plain model it computes (`U·A` and
//! `E_fix + A_emb·Uᵀ` materialized, so any Llama reader loads it), plus its own parameters in
//! `subspace.safetensors` and their moments in `optimizer.safetensors`: `A` cannot be recovered
//! from a trained `U·A` together with its AdamW moments otherwise, and resuming must be exact.
//! On load the sidecar must materialize to the plain weights, so a checkpoint whose weights were
//! edited afterwards is not resumed from stale factors.
//!
//! Checkpoints are untrusted input: the config is validated against caps, file sizes are checked
//! against what the config implies before anything is read, and every tensor's name, shape and
//! dtype is checked against the config. Errors are typed ([`Error`]); nothing here panics on bad
//! bytes.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::Write;
use std::path::{Path, PathBuf};

use candle_core::safetensors::Load;
use candle_core::{DType, Device, Tensor};
use serde::{Deserialize, Serialize};

use crate::{Error, ModelConfig};

/// Weights file of an unsharded checkpoint.
pub const MODEL_FILE: &str = "model.safetensors";
/// Index of a sharded checkpoint (HF layout).
pub const INDEX_FILE: &str = "model.safetensors.index.json";
/// The model shape, HF `config.json`.
pub const CONFIG_FILE: &str = "config.json";
/// AdamW moments, `<param>.exp_avg` and `<param>.exp_avg_sq`, f32.
pub const OPTIMIZER_FILE: &str = "optimizer.safetensors";
/// A subspace model's own parameters (`*.subspace`); its metadata gives the rank and seed.
pub const SUBSPACE_FILE: &str = "subspace.safetensors";
/// Step and free-form run metadata.
pub const STATE_FILE: &str = "train_state.json";
/// The tokenizer a checkpoint carries (HF tokenizers format), when its run had one.
pub const TOKENIZER_FILE: &str = "tokenizer.json";
/// Largest `config.json` / index / state file we read.
const MAX_JSON_BYTES: u64 = 1 << 20;
/// Header allowance on top of the tensor bytes a config implies (safetensors caps headers at 100 MB).
const HEADER_ALLOWANCE: u64 = 100_000_000 + 8;

/// What training needs besides the weights to resume exactly.
#[derive(Debug, Clone, Default)]
pub struct TrainState {
    /// Optimizer steps taken.
    pub step: u64,
    /// AdamW moments by name: `<param>.exp_avg` and `<param>.exp_avg_sq`, each the parameter's
    /// shape. Empty before the first step.
    pub optimizer: HashMap<String, Tensor>,
    /// Free-form run metadata (e.g. the run config, data position), kept verbatim.
    pub metadata: BTreeMap<String, String>,
}

/// A loaded checkpoint: f32 CPU tensors by HF name.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model's shape (from `config.json`).
    pub config: ModelConfig,
    /// Every tensor by its HF name.
    pub tensors: HashMap<String, Tensor>,
    /// The optimizer state and step, when the checkpoint holds one. Its moments belong to the
    /// model that was trained: [`Checkpoint::subspace`]'s when there is one.
    pub state: Option<TrainState>,
    /// The subspace model that was trained, when the checkpoint was saved from one.
    pub subspace: Option<SubspaceModel>,
}

/// A subspace model saved beside its plain materialization ([`SUBSPACE_FILE`]).
#[derive(Debug, Clone)]
pub struct SubspaceModel {
    /// The trained model's config (the plain config with its `subspace_rank` and `subspace_seed`).
    pub config: ModelConfig,
    /// Its `*.subspace` parameters (checked to materialize to the plain weights).
    pub params: HashMap<String, Tensor>,
}

impl Checkpoint {
    /// The model training resumes from: the subspace model when one was saved (its parameters
    /// by name, the plain matrices they replace left out), else the plain one.
    pub fn trained_model(&self) -> (&ModelConfig, HashMap<String, Tensor>) {
        match &self.subspace {
            Some(sub) => {
                let mut t: HashMap<String, Tensor> = self
                    .tensors
                    .iter()
                    .filter(|(n, _)| crate::subspace::param_name(n).is_none())
                    .map(|(n, t)| (n.clone(), t.clone()))
                    .collect();
                t.extend(sub.params.iter().map(|(n, p)| (n.clone(), p.clone())));
                (&sub.config, t)
            }
            None => (&self.config, self.tensors.clone()),
        }
    }
}

/// The trained parameters of `cfg` with their shapes: the HF tensors, with a subspace model's
/// parameters in place of the matrices they replace.
fn parameter_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    crate::subspace::reparametrize(cfg, expected_tensors(cfg))
}

/// A subspace model's own parameters (`*.subspace`, what [`SUBSPACE_FILE`] holds) with their
/// shapes; empty for a plain model.
fn subspace_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    parameter_tensors(cfg)
        .into_iter()
        .filter(|(n, _)| crate::subspace::hf_name(n).is_some())
        .collect()
}

#[derive(Serialize, Deserialize)]
struct StateJson {
    step: u64,
    #[serde(default)]
    metadata: BTreeMap<String, String>,
}

/// Every weight a config implies, with its HF name and shape (`[out, in]` for projections), in a
/// stable order: embedding, layers in order, final norm, head (absent when tied).
pub fn expected_tensors(cfg: &ModelConfig) -> Vec<(String, Vec<usize>)> {
    let h = cfg.hidden_size;
    let kv = cfg.num_kv_heads() * cfg.head_dim();
    let i = cfg.intermediate_size;
    let mut out = vec![(
        "model.embed_tokens.weight".to_string(),
        vec![cfg.vocab_size, h],
    )];
    for l in 0..cfg.num_hidden_layers {
        let p = format!("model.layers.{l}");
        out.push((format!("{p}.input_layernorm.weight"), vec![h]));
        out.push((format!("{p}.self_attn.q_proj.weight"), vec![h, h]));
        out.push((format!("{p}.self_attn.k_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.v_proj.weight"), vec![kv, h]));
        out.push((format!("{p}.self_attn.o_proj.weight"), vec![h, h]));
        out.push((format!("{p}.post_attention_layernorm.weight"), vec![h]));
        out.push((format!("{p}.mlp.gate_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.up_proj.weight"), vec![i, h]));
        out.push((format!("{p}.mlp.down_proj.weight"), vec![h, i]));
    }
    out.push(("model.norm.weight".into(), vec![h]));
    if !cfg.tie_word_embeddings {
        out.push(("lm_head.weight".into(), vec![cfg.vocab_size, h]));
    }
    out
}

/// Tensors other programs write that carry no weights; skipped on load.
fn ignorable(cfg: &ModelConfig, name: &str) -> bool {
    // Old HF Llama checkpoints store the RoPE frequencies; tied checkpoints sometimes also store
    // the head, which HF ignores in favour of the embedding.
    name.ends_with(".self_attn.rotary_emb.inv_freq")
        || (cfg.tie_word_embeddings && name == "lm_head.weight")
}

/// Upper bound on the bytes of all weight files for `cfg` (f32 plus one header per file).
fn weight_bytes_cap(cfg: &ModelConfig, files: u64) -> u64 {
    let params: u64 = expected_tensors(cfg)
        .iter()
        .map(|(_, s)| s.iter().product::<usize>() as u64)
        .sum();
    // Tied checkpoints may carry a redundant head.
    let extra = (cfg.vocab_size * cfg.hidden_size) as u64;
    (params + extra) * 4 + files * HEADER_ALLOWANCE
}

/// The HF `config.json` for `cfg` (architectures, model_type and the fields HF Llama reads).
pub fn config_json(cfg: &ModelConfig) -> Result<String, Error> {
    let mut v = serde_json::to_value(cfg).map_err(|e| Error::Config(e.to_string()))?;
    let obj = v
        .as_object_mut()
        .ok_or_else(|| Error::Config("config is not an object".into()))?;
    obj.insert(
        "architectures".into(),
        serde_json::json!(["LlamaForCausalLM"]),
    );
    obj.insert("model_type".into(), "llama".into());
    obj.insert("hidden_act".into(), "silu".into());
    obj.insert("num_key_value_heads".into(), cfg.num_kv_heads().into());
    obj.insert("torch_dtype".into(), "float32".into());
    obj.insert("attention_bias".into(), false.into());
    obj.insert("mlp_bias".into(), false.into());
    serde_json::to_string_pretty(&v).map_err(|e| Error::Config(e.to_string()))
}

/// Parses and validates a HF `config.json`, rejecting Llama variants our model cannot represent
/// (biases, RoPE scaling, other activations, a head dim that is not hidden / heads).
pub fn parse_config(bytes: &[u8]) -> Result<ModelConfig, Error> {
    let v: serde_json::Value =
        serde_json::from_slice(bytes).map_err(|e| Error::Config(format!("config.json: {e}")))?;
    let unsupported = |msg: String| Err(Error::Config(format!("unsupported Llama variant: {msg}")));
    if let Some(t) = v.get("model_type").and_then(|t| t.as_str())
        && !matches!(t, "llama" | "mistral")
    {
        return unsupported(format!("model_type {t}"));
    }
    if let Some(act) = v.get("hidden_act").and_then(|a| a.as_str())
        && act != "silu"
    {
        return unsupported(format!("hidden_act {act}"));
    }
    for flag in ["attention_bias", "mlp_bias"] {
        if v.get(flag).and_then(|b| b.as_bool()) == Some(true) {
            return unsupported(flag.into());
        }
    }
    if v.get("rope_scaling").is_some_and(|r| !r.is_null()) {
        return unsupported("rope_scaling".into());
    }
    let cfg: ModelConfig = serde_json::from_value(v.clone())
        .map_err(|e| Error::Config(format!("config.json: {e}")))?;
    cfg.validate()?;
    if let Some(hd) = v.get("head_dim").and_then(|h| h.as_u64())
        && hd as usize != cfg.head_dim()
    {
        return unsupported(format!(
            "head_dim {hd} != hidden_size / num_attention_heads"
        ));
    }
    Ok(cfg)
}

/// Reads and checks the weights in safetensors `bytes` (one file of a checkpoint for `cfg`):
/// every tensor must be a known name with the config's shape and a float dtype (F32, F16, BF16),
/// finite, and not already in `out`. Ignorable tensors (see [`expected_tensors`]) are skipped.
/// Completeness is checked by the caller.
pub fn read_safetensors(
    bytes: &[u8],
    cfg: &ModelConfig,
    out: &mut HashMap<String, Tensor>,
) -> Result<(), Error> {
    let expected: HashMap<String, Vec<usize>> = expected_tensors(cfg).into_iter().collect();
    read_checked(bytes, &expected, out, |name| ignorable(cfg, name))
}

fn read_checked(
    bytes: &[u8],
    expected: &HashMap<String, Vec<usize>>,
    out: &mut HashMap<String, Tensor>,
    ignorable: impl Fn(&str) -> bool,
) -> Result<(), Error> {
    let st = safetensors::SafeTensors::deserialize(bytes)
        .map_err(|e| Error::Checkpoint(format!("safetensors: {e}")))?;
    for (name, view) in st.iter() {
        if ignorable(name) {
            continue;
        }
        let Some(shape) = expected.get(name) else {
            return Err(Error::UnexpectedTensor { name: name.into() });
        };
        if out.contains_key(name) {
            return Err(Error::Checkpoint(format!("tensor {name} stored twice")));
        }
        use safetensors::Dtype as D;
        if !matches!(view.dtype(), D::F32 | D::F16 | D::BF16) {
            return Err(Error::TensorDtype {
                name: name.into(),
                dtype: format!("{:?}", view.dtype()),
            });
        }
        if view.shape() != shape.as_slice() {
            return Err(Error::TensorShape {
                name: name.into(),
                expected: shape.clone(),
                found: view.shape().to_vec(),
            });
        }
        let t = view.load(&Device::Cpu)?.to_dtype(DType::F32)?;
        let finite = t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .all(|x| x.is_finite());
        if !finite {
            return Err(Error::Checkpoint(format!(
                "tensor {name} has non-finite values"
            )));
        }
        out.insert(name.to_string(), t);
    }
    Ok(())
}

fn check_complete(
    expected: &[(String, Vec<usize>)],
    got: &HashMap<String, Tensor>,
) -> Result<(), Error> {
    for (name, _) in expected {
        if !got.contains_key(name) {
            return Err(Error::MissingTensor { name: name.clone() });
        }
    }
    Ok(())
}

/// Reads a file whose size must not exceed `cap`, checked before allocating.
fn read_capped(path: &Path, cap: u64) -> Result<Vec<u8>, Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let len = std::fs::metadata(path).map_err(io)?.len();
    if len > cap {
        return Err(Error::Checkpoint(format!(
            "{}: {len} bytes, more than the {cap} its config allows",
            path.display()
        )));
    }
    std::fs::read(path).map_err(io)
}

/// Loads a HF-format Llama checkpoint directory (ours or another program's): `config.json`, then
/// `model.safetensors` or the shards of `model.safetensors.index.json`, then our training state if
/// present. Weights become f32 on the CPU.
pub fn load(dir: &Path) -> Result<Checkpoint, Error> {
    let cfg = parse_config(&read_capped(&dir.join(CONFIG_FILE), MAX_JSON_BYTES)?)?;
    let mut tensors = HashMap::new();
    let single = dir.join(MODEL_FILE);
    if single.exists() {
        let bytes = read_capped(&single, weight_bytes_cap(&cfg, 1))?;
        read_safetensors(&bytes, &cfg, &mut tensors)?;
    } else {
        let files = shard_files(dir, &cfg)?;
        let mut total = 0u64;
        let cap = weight_bytes_cap(&cfg, files.len() as u64);
        for (file, names) in &files {
            let path = dir.join(file);
            let bytes = read_capped(&path, cap - total.min(cap))?;
            total += bytes.len() as u64;
            let mut part = HashMap::new();
            read_safetensors(&bytes, &cfg, &mut part)?;
            for name in part.keys() {
                if !names.contains(name) {
                    return Err(Error::Checkpoint(format!(
                        "{file} holds {name}, which the index places elsewhere"
                    )));
                }
                if tensors.contains_key(name) {
                    return Err(Error::Checkpoint(format!("tensor {name} stored twice")));
                }
            }
            tensors.extend(part);
        }
    }
    check_complete(&expected_tensors(&cfg), &tensors)?;
    let subspace = load_subspace(dir, &cfg, &tensors)?;
    let state = load_state(dir, subspace.as_ref().map_or(&cfg, |s| &s.config))?;
    Ok(Checkpoint {
        config: cfg,
        tensors,
        state,
        subspace,
    })
}

/// Reads [`SUBSPACE_FILE`] when present: the rank and seed from its metadata, the `*.subspace`
/// parameters checked by name and shape, and their materialization checked against `plain`.
fn load_subspace(
    dir: &Path,
    plain_cfg: &ModelConfig,
    plain: &HashMap<String, Tensor>,
) -> Result<Option<SubspaceModel>, Error> {
    let path = dir.join(SUBSPACE_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let bytes = read_capped(&path, weight_bytes_cap(plain_cfg, 1))?;
    read_subspace(&bytes, plain_cfg, plain).map(Some)
}

/// Reads and checks [`SUBSPACE_FILE`] `bytes` of a checkpoint of `plain_cfg` whose plain weights
/// are `plain`: rank and seed from its metadata, every `*.subspace` parameter of that model with
/// its shape, finite, and materializing to the plain matrix it replaces (where `plain` has it).
pub fn read_subspace(
    bytes: &[u8],
    plain_cfg: &ModelConfig,
    plain: &HashMap<String, Tensor>,
) -> Result<SubspaceModel, Error> {
    let bad = |m: String| Error::Checkpoint(format!("{SUBSPACE_FILE}: {m}"));
    let (_, meta) = safetensors::SafeTensors::read_metadata(bytes)
        .map_err(|e| bad(format!("safetensors: {e}")))?;
    let field = |key: &str| -> Result<u64, Error> {
        meta.metadata()
            .as_ref()
            .and_then(|m| m.get(key))
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| bad(format!("no {key} in its metadata")))
    };
    let config = ModelConfig {
        subspace_rank: usize::try_from(field("subspace_rank")?)
            .map_err(|_| bad("subspace_rank out of range".into()))?,
        subspace_seed: field("subspace_seed")?,
        ..plain_cfg.clone()
    };
    if config.subspace_rank == 0 {
        return Err(bad("subspace_rank 0".into()));
    }
    config.validate()?;
    let own = subspace_tensors(&config);
    let expected: HashMap<String, Vec<usize>> = own.iter().cloned().collect();
    let mut params = HashMap::new();
    read_checked(bytes, &expected, &mut params, |_| false)?;
    check_complete(&own, &params)?;
    // The factors must be the ones the plain weights came from: bitwise for the f32 we save, up
    // to the rounding of a 16-bit copy otherwise.
    for (name, w) in crate::subspace::materialize(&config, &params)? {
        let Some(stored) = plain.get(&name) else {
            continue;
        };
        let scale = stored
            .abs()?
            .max_all()?
            .to_scalar::<f32>()?
            .max(f32::MIN_POSITIVE);
        let diff = (&w - stored)?.abs()?.max_all()?.to_scalar::<f32>()?;
        if diff > 1e-3 * scale {
            return Err(bad(format!(
                "does not materialize to {name} of the weights (off by {diff:.3e}): the weights \
                 changed after it was saved; remove it to load the plain model"
            )));
        }
    }
    Ok(SubspaceModel { config, params })
}

/// Loads any checkpoint we understand: a HF-format directory ([`load`]) or a llama2.c `.bin`
/// file ([`crate::llama2c::import`], which has no training state).
pub fn load_any(path: &Path) -> Result<Checkpoint, Error> {
    if path.is_dir() {
        return load(path);
    }
    let (config, tensors) = crate::llama2c::import(path)?;
    Ok(Checkpoint {
        config,
        tensors,
        state: None,
        subspace: None,
    })
}

/// The shard files of an index and the tensors each should hold.
fn shard_files(dir: &Path, cfg: &ModelConfig) -> Result<BTreeMap<String, HashSet<String>>, Error> {
    let index_path = dir.join(INDEX_FILE);
    if !index_path.exists() {
        return Err(Error::Checkpoint(format!(
            "{}: neither {MODEL_FILE} nor {INDEX_FILE}",
            dir.display()
        )));
    }
    #[derive(Deserialize)]
    struct Index {
        weight_map: BTreeMap<String, String>,
    }
    let index: Index = serde_json::from_slice(&read_capped(&index_path, MAX_JSON_BYTES)?)
        .map_err(|e| Error::Checkpoint(format!("{INDEX_FILE}: {e}")))?;
    let mut files: BTreeMap<String, HashSet<String>> = BTreeMap::new();
    for (name, file) in index.weight_map {
        // Shards must be plain files in the checkpoint directory: no path tricks.
        let plain = !file.is_empty()
            && !file.starts_with('.')
            && !file.contains(['/', '\\'])
            && file.ends_with(".safetensors");
        if !plain {
            return Err(Error::Checkpoint(format!(
                "{INDEX_FILE}: bad shard file name {file:?}"
            )));
        }
        files.entry(file).or_default().insert(name);
    }
    let max_files = expected_tensors(cfg).len() + 1;
    if files.is_empty() || files.len() > max_files {
        return Err(Error::Checkpoint(format!(
            "{INDEX_FILE}: {} shard files",
            files.len()
        )));
    }
    Ok(files)
}

fn load_state(dir: &Path, cfg: &ModelConfig) -> Result<Option<TrainState>, Error> {
    let state_path = dir.join(STATE_FILE);
    if !state_path.exists() {
        return Ok(None);
    }
    let s: StateJson = serde_json::from_slice(&read_capped(&state_path, MAX_JSON_BYTES)?)
        .map_err(|e| Error::Checkpoint(format!("{STATE_FILE}: {e}")))?;
    let opt_path = dir.join(OPTIMIZER_FILE);
    let mut optimizer = HashMap::new();
    if opt_path.exists() {
        let bytes = read_capped(&opt_path, 2 * weight_bytes_cap(cfg, 1))?;
        let expected: HashMap<String, Vec<usize>> = parameter_tensors(cfg)
            .into_iter()
            .flat_map(|(n, s)| {
                [
                    (format!("{n}.exp_avg"), s.clone()),
                    (format!("{n}.exp_avg_sq"), s),
                ]
            })
            .collect();
        read_checked(&bytes, &expected, &mut optimizer, |_| false)?;
        if !optimizer.is_empty() && optimizer.len() != expected.len() {
            let missing = expected.keys().find(|k| !optimizer.contains_key(*k));
            return Err(Error::MissingTensor {
                name: missing.cloned().unwrap_or_default(),
            });
        }
    }
    Ok(Some(TrainState {
        step: s.step,
        optimizer,
        metadata: s.metadata,
    }))
}

/// Writes a checkpoint to `dir` atomically: everything goes to a temporary sibling directory,
/// is fsynced, and is renamed into place, so a crash leaves either the old checkpoint or the new
/// one, never half of one. An existing `dir` is replaced only if it looks like a checkpoint (or is
/// empty). `tensors` must be exactly [`expected_tensors`] (f32, f16 or bf16; f64 is stored as f32).
pub fn save(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    state: Option<&TrainState>,
) -> Result<(), Error> {
    save_with_tokenizer(dir, cfg, tensors, state, None)
}

/// [`save`], also copying the run's `tokenizer.json` (`tokenizer`) into the checkpoint, so that
/// `swarm eval`/`generate`, candle-transformers and HF transformers find it beside the weights.
pub fn save_with_tokenizer(
    dir: &Path,
    cfg: &ModelConfig,
    tensors: &HashMap<String, Tensor>,
    state: Option<&TrainState>,
    tokenizer: Option<&Path>,
) -> Result<(), Error> {
    cfg.validate()?;
    // A subspace model: the plain model it computes, plus its own parameters (module docs).
    // The moments are the trained model's, by its parameter names.
    let trained = cfg;
    let params = parameter_tensors(trained);
    let plain;
    let materialized;
    let (cfg, tensors, subspace) = if trained.subspace_rank > 0 {
        let own = subspace_tensors(trained);
        let picked: HashMap<String, Tensor> = own
            .iter()
            .filter_map(|(n, _)| tensors.get(n).map(|t| (n.clone(), t.clone())))
            .collect();
        let subspace = checked_for_save(&own, &picked)?;
        plain = ModelConfig {
            subspace_rank: 0,
            subspace_seed: 0,
            ..trained.clone()
        };
        materialized = crate::subspace::materialize(trained, tensors)?;
        (&plain, &materialized, Some(subspace))
    } else {
        (cfg, tensors, None)
    };
    let tokenizer = match tokenizer {
        Some(p) => {
            let file = if p.is_dir() {
                p.join(TOKENIZER_FILE)
            } else {
                p.to_path_buf()
            };
            Some(std::fs::read(&file).map_err(|source| Error::Io { path: file, source })?)
        }
        None => None,
    };
    let expected = expected_tensors(cfg);
    let weights = checked_for_save(&expected, tensors)?;
    let optimizer = match state {
        Some(s) if !s.optimizer.is_empty() => {
            let moments: Vec<(String, Vec<usize>)> = params
                .iter()
                .flat_map(|(n, s)| {
                    [
                        (format!("{n}.exp_avg"), s.clone()),
                        (format!("{n}.exp_avg_sq"), s.clone()),
                    ]
                })
                .collect();
            Some(checked_for_save(&moments, &s.optimizer)?)
        }
        _ => None,
    };

    let name = dir
        .file_name()
        .ok_or_else(|| Error::Checkpoint(format!("{}: not a directory name", dir.display())))?
        .to_string_lossy()
        .into_owned();
    let parent = match dir.parent() {
        Some(p) if !p.as_os_str().is_empty() => p.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let io = |path: &Path| {
        let path = path.to_path_buf();
        move |source| Error::Io { path, source }
    };
    std::fs::create_dir_all(&parent).map_err(io(&parent))?;
    let tmp = parent.join(format!(".{name}.tmp-{}", std::process::id()));
    if tmp.exists() {
        std::fs::remove_dir_all(&tmp).map_err(io(&tmp))?;
    }
    std::fs::create_dir(&tmp).map_err(io(&tmp))?;

    let meta = HashMap::from([("format".to_string(), "pt".to_string())]);
    write_synced(&tmp.join(CONFIG_FILE), config_json(cfg)?.as_bytes())?;
    let bytes = safetensors::serialize(weights, Some(meta.clone()))
        .map_err(|e| Error::Checkpoint(format!("serialize: {e}")))?;
    write_synced(&tmp.join(MODEL_FILE), &bytes)?;
    if let Some(own) = subspace {
        let meta = HashMap::from([
            ("format".to_string(), "pt".to_string()),
            (
                "subspace_rank".to_string(),
                trained.subspace_rank.to_string(),
            ),
            (
                "subspace_seed".to_string(),
                trained.subspace_seed.to_string(),
            ),
        ]);
        let bytes = safetensors::serialize(own, Some(meta))
            .map_err(|e| Error::Checkpoint(format!("serialize: {e}")))?;
        write_synced(&tmp.join(SUBSPACE_FILE), &bytes)?;
    }
    if let Some(s) = state {
        if let Some(opt) = optimizer {
            let bytes = safetensors::serialize(opt, Some(meta))
                .map_err(|e| Error::Checkpoint(format!("serialize: {e}")))?;
            write_synced(&tmp.join(OPTIMIZER_FILE), &bytes)?;
        }
        let json = serde_json::to_vec_pretty(&StateJson {
            step: s.step,
            metadata: s.metadata.clone(),
        })
        .map_err(|e| Error::Checkpoint(e.to_string()))?;
        write_synced(&tmp.join(STATE_FILE), &json)?;
    }
    if let Some(t) = &tokenizer {
        write_synced(&tmp.join(TOKENIZER_FILE), t)?;
    }
    sync_dir(&tmp)?;

    if dir.exists() {
        refuse_unless_checkpoint(dir)?;
        let old = parent.join(format!(".{name}.old-{}", std::process::id()));
        if old.exists() {
            std::fs::remove_dir_all(&old).map_err(io(&old))?;
        }
        std::fs::rename(dir, &old).map_err(io(dir))?;
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
        std::fs::remove_dir_all(&old).map_err(io(&old))?;
    } else {
        std::fs::rename(&tmp, dir).map_err(io(dir))?;
    }
    sync_dir(&parent)?;
    tracing::debug!(dir = %dir.display(), tensors = tensors.len(), "checkpoint saved");
    Ok(())
}

/// Tensors in `expected` order, each checked and converted to a storable dtype.
fn checked_for_save(
    expected: &[(String, Vec<usize>)],
    tensors: &HashMap<String, Tensor>,
) -> Result<Vec<(String, Tensor)>, Error> {
    let names: HashSet<&str> = expected.iter().map(|(n, _)| n.as_str()).collect();
    if let Some(extra) = tensors.keys().find(|k| !names.contains(k.as_str())) {
        return Err(Error::UnexpectedTensor {
            name: extra.clone(),
        });
    }
    let mut out = Vec::with_capacity(expected.len());
    for (name, shape) in expected {
        let t = tensors
            .get(name)
            .ok_or_else(|| Error::MissingTensor { name: name.clone() })?;
        if t.dims() != shape.as_slice() {
            return Err(Error::TensorShape {
                name: name.clone(),
                expected: shape.clone(),
                found: t.dims().to_vec(),
            });
        }
        let t = match t.dtype() {
            DType::F32 | DType::F16 | DType::BF16 => t.clone(),
            DType::F64 => t.to_dtype(DType::F32)?,
            d => {
                return Err(Error::TensorDtype {
                    name: name.clone(),
                    dtype: format!("{d:?}"),
                });
            }
        };
        out.push((name.clone(), t.to_device(&Device::Cpu)?.contiguous()?));
    }
    Ok(out)
}

fn refuse_unless_checkpoint(dir: &Path) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: dir.to_path_buf(),
        source,
    };
    let known = [
        CONFIG_FILE,
        MODEL_FILE,
        INDEX_FILE,
        OPTIMIZER_FILE,
        SUBSPACE_FILE,
        STATE_FILE,
        TOKENIZER_FILE,
    ];
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name().to_string_lossy().into_owned();
        let ok = entry.file_type().map_err(io)?.is_file()
            && (known.contains(&name.as_str()) || name.ends_with(".safetensors"));
        if !ok {
            return Err(Error::Checkpoint(format!(
                "refusing to replace {}: it holds {name}, which is not part of a checkpoint",
                dir.display()
            )));
        }
    }
    Ok(())
}

fn write_synced(path: &Path, bytes: &[u8]) -> Result<(), Error> {
    let io = |source| Error::Io {
        path: path.to_path_buf(),
        source,
    };
    let mut f = std::fs::File::create(path).map_err(io)?;
    f.write_all(bytes).map_err(io)?;
    f.sync_all().map_err(io)
}

fn sync_dir(dir: &Path) -> Result<(), Error> {
    // Makes the renames durable; directories cannot be opened for sync on every platform.
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    pub(crate) fn cfg(kv: usize, tied: bool) -> ModelConfig {
        ModelConfig {
            hidden_size: 16,
            intermediate_size: 24,
            num_hidden_layers: 2,
            num_attention_heads: 4,
            num_key_value_heads: Some(kv),
            vocab_size: 40,
            rms_norm_eps: 1e-5,
            rope_theta: 10_000.0,
            max_position_embeddings: 32,
            tie_word_embeddings: tied,
            subspace_rank: 0,
            subspace_seed: 0,
        }
    }

    fn random(cfg: &ModelConfig, seed: u64) -> HashMap<String, Tensor> {
        use rand::{Rng, SeedableRng};
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        expected_tensors(cfg)
            .into_iter()
            .map(|(n, s)| {
                let v: Vec<f32> = (0..s.iter().product())
                    .map(|_| rng.random_range(-1.0..1.0))
                    .collect();
                (n, Tensor::from_vec(v, s, &Device::Cpu).unwrap())
            })
            .collect()
    }

    fn same(a: &Tensor, b: &Tensor) -> bool {
        a.dims() == b.dims()
            && a.flatten_all().unwrap().to_vec1::<f32>().unwrap()
                == b.flatten_all().unwrap().to_vec1::<f32>().unwrap()
    }

    #[test]
    fn save_then_load_round_trips_weights_and_state() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("ckpt");
        for (kv, tied) in [(2, false), (4, true)] {
            let c = cfg(kv, tied);
            let w = random(&c, 1);
            let mut optimizer = HashMap::new();
            for (n, t) in random(&c, 2) {
                optimizer.insert(format!("{n}.exp_avg"), t);
            }
            for (n, t) in random(&c, 3) {
                optimizer.insert(format!("{n}.exp_avg_sq"), t);
            }
            let state = TrainState {
                step: 17,
                optimizer,
                metadata: BTreeMap::from([("seed".into(), "5".into())]),
            };
            save(&path, &c, &w, Some(&state)).unwrap();
            let back = load(&path).unwrap();
            assert_eq!(back.config, c);
            assert_eq!(back.tensors.len(), w.len());
            for (n, t) in &w {
                assert!(same(t, &back.tensors[n]), "{n}");
            }
            let s = back.state.unwrap();
            assert_eq!(s.step, 17);
            assert_eq!(s.metadata, state.metadata);
            for (n, t) in &state.optimizer {
                assert!(same(t, &s.optimizer[n]), "{n}");
            }
            // Overwriting replaces the checkpoint and leaves no temporary directories behind.
            let names: Vec<String> = std::fs::read_dir(dir.path())
                .unwrap()
                .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
                .collect();
            assert_eq!(names, vec!["ckpt".to_string()]);
        }
        // Without state there is no state on load.
        let c = cfg(2, true);
        save(&path, &c, &random(&c, 4), None).unwrap();
        assert!(load(&path).unwrap().state.is_none());
    }

    #[test]
    fn save_refuses_to_replace_a_directory_that_is_not_a_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("notes.txt"), "mine").unwrap();
        let c = cfg(2, false);
        let err = save(dir.path(), &c, &random(&c, 1), None).unwrap_err();
        assert!(matches!(err, Error::Checkpoint(_)), "{err}");
        assert!(dir.path().join("notes.txt").exists());
    }

    #[test]
    fn save_rejects_wrong_tensor_sets() {
        let dir = tempfile::tempdir().unwrap();
        let c = cfg(2, false);
        let mut w = random(&c, 1);
        w.remove("lm_head.weight");
        assert!(matches!(
            save(&dir.path().join("a"), &c, &w, None),
            Err(Error::MissingTensor { .. })
        ));
        let mut w = random(&c, 1);
        w.insert(
            "extra".into(),
            Tensor::zeros(3, DType::F32, &Device::Cpu).unwrap(),
        );
        assert!(matches!(
            save(&dir.path().join("a"), &c, &w, None),
            Err(Error::UnexpectedTensor { .. })
        ));
        assert!(!dir.path().join("a").exists());
    }

    #[test]
    fn config_json_is_hf_llama() {
        let c = cfg(2, true);
        let s = config_json(&c).unwrap();
        let v: serde_json::Value = serde_json::from_str(&s).unwrap();
        assert_eq!(v["model_type"], "llama");
        assert_eq!(v["num_key_value_heads"], 2);
        assert_eq!(parse_config(s.as_bytes()).unwrap(), c);
        let mut bad = v.clone();
        bad["rope_scaling"] = serde_json::json!({"type": "linear", "factor": 2.0});
        assert!(matches!(
            parse_config(bad.to_string().as_bytes()),
            Err(Error::Config(_))
        ));
        let mut bad = v.clone();
        bad["hidden_size"] = serde_json::json!(1u64 << 40);
        assert!(matches!(
            parse_config(bad.to_string().as_bytes()),
            Err(Error::Config(_))
        ));
        assert!(matches!(parse_config(b"{not json"), Err(Error::Config(_))));
    }

    fn write_st(dir: &Path, tensors: &[(String, Tensor)]) {
        let bytes =
            safetensors::serialize(tensors.iter().map(|(n, t)| (n.clone(), t)), None).unwrap();
        std::fs::write(dir.join(MODEL_FILE), bytes).unwrap();
    }

    fn saved(c: &ModelConfig) -> (tempfile::TempDir, Vec<(String, Tensor)>) {
        let dir = tempfile::tempdir().unwrap();
        let w = random(c, 9);
        std::fs::write(dir.path().join(CONFIG_FILE), config_json(c).unwrap()).unwrap();
        let list: Vec<(String, Tensor)> = expected_tensors(c)
            .into_iter()
            .map(|(n, _)| (n.clone(), w[&n].clone()))
            .collect();
        write_st(dir.path(), &list);
        assert!(load(dir.path()).is_ok());
        (dir, list)
    }

    #[test]
    fn malformed_checkpoints_give_typed_errors() {
        let c = cfg(2, false);
        let (dir, list) = saved(&c);
        let file = dir.path().join(MODEL_FILE);
        let good = std::fs::read(&file).unwrap();

        // Truncated data and truncated header.
        for cut in [good.len() - 1, good.len() / 2, 20, 7, 0] {
            std::fs::write(&file, &good[..cut]).unwrap();
            assert!(
                matches!(load(dir.path()), Err(Error::Checkpoint(_))),
                "cut {cut}"
            );
        }
        // Hostile header length: claims ~2^64 and 2^40 bytes of header.
        for n in [u64::MAX, 1 << 40, good.len() as u64] {
            let mut bytes = good.clone();
            bytes[..8].copy_from_slice(&n.to_le_bytes());
            std::fs::write(&file, &bytes).unwrap();
            assert!(
                matches!(load(dir.path()), Err(Error::Checkpoint(_))),
                "header {n}"
            );
        }
        // Missing tensor.
        write_st(dir.path(), &list[1..]);
        assert!(
            matches!(load(dir.path()), Err(Error::MissingTensor { name }) if name == "model.embed_tokens.weight")
        );
        // Wrong shape.
        let mut bad = list.clone();
        bad[1].1 = Tensor::zeros(17, DType::F32, &Device::Cpu).unwrap();
        write_st(dir.path(), &bad);
        assert!(
            matches!(load(dir.path()), Err(Error::TensorShape { found, .. }) if found == vec![17])
        );
        // Finite but wrong dtype (integers where weights belong).
        let mut bad = list.clone();
        bad[1].1 = bad[1].1.to_dtype(DType::U32).unwrap();
        write_st(dir.path(), &bad);
        assert!(matches!(load(dir.path()), Err(Error::TensorDtype { .. })));
        let mut bad = list.clone();
        bad[1].1 = bad[1].1.to_dtype(DType::F64).unwrap();
        write_st(dir.path(), &bad);
        assert!(matches!(load(dir.path()), Err(Error::TensorDtype { .. })));
        // Unknown tensor.
        let mut bad = list.clone();
        bad.push((
            "model.layers.9.mlp.up_proj.weight".into(),
            list[1].1.clone(),
        ));
        write_st(dir.path(), &bad);
        assert!(matches!(
            load(dir.path()),
            Err(Error::UnexpectedTensor { .. })
        ));
        // Non-finite weights.
        let mut bad = list.clone();
        bad[1].1 = (bad[1].1.clone() / 0.0).unwrap();
        write_st(dir.path(), &bad);
        assert!(matches!(load(dir.path()), Err(Error::Checkpoint(_))));
        // A weights file far larger than the config allows is refused before it is read.
        let f = std::fs::File::create(&file).unwrap();
        f.set_len(weight_bytes_cap(&c, 1) + 1).unwrap();
        let err = load(dir.path()).unwrap_err().to_string();
        assert!(err.contains("config allows"), "{err}");
        // Missing config and hostile config.
        std::fs::write(
            dir.path().join(CONFIG_FILE),
            "{\"hidden_size\": 18446744073709551615}",
        )
        .unwrap();
        assert!(matches!(load(dir.path()), Err(Error::Config(_))));
        std::fs::remove_file(dir.path().join(CONFIG_FILE)).unwrap();
        assert!(matches!(load(dir.path()), Err(Error::Io { .. })));
    }

    #[test]
    fn loads_sharded_half_precision_checkpoints_and_checks_the_index() {
        let c = cfg(2, false);
        let (dir, list) = saved(&c);
        std::fs::remove_file(dir.path().join(MODEL_FILE)).unwrap();
        // Two shards in bf16, reverse order, as another program might write them.
        let (a, b) = list.split_at(list.len() / 2);
        let half = |ts: &[(String, Tensor)]| -> Vec<(String, Tensor)> {
            ts.iter()
                .rev()
                .map(|(n, t)| (n.clone(), t.to_dtype(DType::BF16).unwrap()))
                .collect()
        };
        for (file, part) in [
            ("model-00001-of-00002.safetensors", a),
            ("model-00002-of-00002.safetensors", b),
        ] {
            let bytes =
                safetensors::serialize(half(part).iter().map(|(n, t)| (n.clone(), t)), None)
                    .unwrap();
            std::fs::write(dir.path().join(file), bytes).unwrap();
        }
        let mut map = serde_json::Map::new();
        for (n, _) in a {
            map.insert(n.clone(), "model-00001-of-00002.safetensors".into());
        }
        for (n, _) in b {
            map.insert(n.clone(), "model-00002-of-00002.safetensors".into());
        }
        let index = serde_json::json!({"metadata": {"total_size": 0}, "weight_map": map});
        std::fs::write(dir.path().join(INDEX_FILE), index.to_string()).unwrap();
        let ck = load(dir.path()).unwrap();
        for (n, t) in &list {
            let want = t
                .to_dtype(DType::BF16)
                .unwrap()
                .to_dtype(DType::F32)
                .unwrap();
            assert!(same(&want, &ck.tensors[n]), "{n}");
        }
        // A shard path that escapes the directory is refused.
        let mut evil = index.clone();
        evil["weight_map"]["model.norm.weight"] = "../../etc/passwd.safetensors".into();
        std::fs::write(dir.path().join(INDEX_FILE), evil.to_string()).unwrap();
        assert!(matches!(load(dir.path()), Err(Error::Checkpoint(_))));
        // A tensor in a shard the index does not assign it to.
        let mut moved = index.clone();
        moved["weight_map"][&a[0].0] = "model-00002-of-00002.safetensors".into();
        std::fs::write(dir.path().join(INDEX_FILE), moved.to_string()).unwrap();
        assert!(matches!(load(dir.path()), Err(Error::Checkpoint(_))));
    }
}
