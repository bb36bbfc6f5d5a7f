//! Checkpoints in safetensors: parameters, optimizer moments, router biases, the RNG state,
//! and in the metadata the model and optimizer configurations (TOML), the step and any
//! caller's strings. Written atomically (a temporary file in the same folder, synced, then
//! renamed), so an interrupted or failed write (full disk) never replaces a good checkpoint.
//!
//! Tensor names: `param/<name>`, `adam_m/<name>`, `adam_v/<name>`, `router_bias/<i>`, `rng`
//! (U64 `[4]`). All little-endian. Loading checks the format tag, the configuration, every
//! tensor's presence, dtype and shape: a corrupt or foreign file is an error naming what is
//! wrong, never a panic.

use crate::config::ModelConfig;
use crate::model::Model;
use crate::optim::{AdamW, AdamWConfig};
use crate::params::Params;
use crate::rng::Rng;
use crate::{Error, Result};
use safetensors::tensor::{Dtype, TensorView};
use safetensors::SafeTensors;
use std::collections::{BTreeMap, HashMap};
use std::io::Write;
use std::path::Path;

/// The `format` metadata value.
pub const FORMAT: &str = "moekit-model-checkpoint-v1";

/// A loaded checkpoint.
#[derive(Debug, Clone)]
pub struct Checkpoint {
    /// The model (experts on the host or the CPU references; choose a device after loading).
    pub model: Model,
    /// The optimizer, if one was saved.
    pub optimizer: Option<AdamW>,
    /// The RNG, if one was saved.
    pub rng: Option<Rng>,
    /// The caller's metadata.
    pub extra: BTreeMap<String, String>,
}

fn err(path: &Path, msg: impl Into<String>) -> Error {
    Error::Checkpoint { path: path.display().to_string(), msg: msg.into() }
}

fn f32_bytes(v: &[f32]) -> Vec<u8> {
    v.iter().flat_map(|x| x.to_le_bytes()).collect()
}

/// Saves a checkpoint to `path` atomically.
pub fn save(
    path: &Path,
    model: &Model,
    optimizer: Option<&AdamW>,
    rng: Option<&Rng>,
    extra: &BTreeMap<String, String>,
) -> Result<()> {
    let mut blobs: Vec<(String, Vec<usize>, Dtype, Vec<u8>)> = Vec::new();
    let p = &model.params;
    for (i, name) in p.names.iter().enumerate() {
        blobs.push((format!("param/{name}"), p.shapes[i].clone(), Dtype::F32, f32_bytes(&p.data[i])));
        if let Some(opt) = optimizer {
            blobs.push((format!("adam_m/{name}"), p.shapes[i].clone(), Dtype::F32, f32_bytes(&opt.m.data[i])));
            blobs.push((format!("adam_v/{name}"), p.shapes[i].clone(), Dtype::F32, f32_bytes(&opt.v.data[i])));
        }
    }
    for (i, b) in model.router_bias.iter().enumerate() {
        blobs.push((format!("router_bias/{i}"), vec![b.len()], Dtype::F32, f32_bytes(b)));
    }
    if let Some(r) = rng {
        blobs.push(("rng".into(), vec![4], Dtype::U64, r.state().iter().flat_map(|x| x.to_le_bytes()).collect()));
    }
    let mut meta: HashMap<String, String> = extra.iter().map(|(k, v)| (format!("extra.{k}"), v.clone())).collect();
    meta.insert("format".into(), FORMAT.into());
    meta.insert("config".into(), model.cfg.to_toml());
    if let Some(opt) = optimizer {
        meta.insert("optimizer".into(), toml::to_string(&opt.cfg).unwrap_or_default());
        meta.insert("step".into(), opt.step.to_string());
    }
    let views: Vec<(String, TensorView<'_>)> = blobs
        .iter()
        .map(|(n, s, d, b)| TensorView::new(*d, s.clone(), b).map(|v| (n.clone(), v)))
        .collect::<std::result::Result<_, _>>()
        .map_err(|e| err(path, format!("cannot describe a tensor: {e}")))?;
    let bytes = safetensors::serialize(views, &Some(meta)).map_err(|e| err(path, format!("serialize: {e}")))?;
    write_atomic(path, &bytes)
}

/// Writes `bytes` to `path` through a synced temporary file in the same folder and a rename;
/// on any failure the temporary file is removed and `path` is untouched.
pub fn write_atomic(path: &Path, bytes: &[u8]) -> Result<()> {
    let dir = path.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    let name = path.file_name().ok_or_else(|| err(path, "not a file path"))?.to_string_lossy();
    let tmp = dir.join(format!(".{name}.tmp-{}", std::process::id()));
    let io = |e: std::io::Error| err(path, format!("write failed, previous file kept: {e}"));
    let result = (|| {
        let mut f = std::fs::File::create(&tmp).map_err(io)?;
        f.write_all(bytes).map_err(io)?;
        f.sync_all().map_err(io)?;
        std::fs::rename(&tmp, path).map_err(io)?;
        if let Ok(d) = std::fs::File::open(dir) {
            let _ = d.sync_all();
        }
        Ok(())
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result
}

fn f32_tensor(st: &SafeTensors<'_>, path: &Path, name: &str, shape: &[usize]) -> Result<Vec<f32>> {
    let t = st.tensor(name).map_err(|_| err(path, format!("missing tensor {name}")))?;
    if t.dtype() != Dtype::F32 || t.shape() != shape {
        return Err(err(path, format!("tensor {name}: {:?} {:?}, expected F32 {shape:?}", t.dtype(), t.shape())));
    }
    Ok(t.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect())
}

/// Loads a checkpoint saved by [`save`].
pub fn load(path: &Path) -> Result<Checkpoint> {
    let bytes = std::fs::read(path).map_err(|e| err(path, format!("cannot read: {e}")))?;
    let (_, meta) =
        SafeTensors::read_metadata(&bytes).map_err(|e| err(path, format!("not a safetensors file: {e}")))?;
    let st = SafeTensors::deserialize(&bytes).map_err(|e| err(path, format!("corrupt safetensors file: {e}")))?;
    let meta = meta.metadata().clone().unwrap_or_default();
    if meta.get("format").map(String::as_str) != Some(FORMAT) {
        return Err(err(path, format!("not a moekit model checkpoint (format {:?})", meta.get("format"))));
    }
    let cfg = ModelConfig::from_toml(meta.get("config").map(String::as_str).unwrap_or_default())
        .map_err(|e| err(path, format!("config: {e}")))?;
    let mut params = Params::zeros(&cfg);
    for i in 0..params.names.len() {
        params.data[i] = f32_tensor(&st, path, &format!("param/{}", params.names[i]), &params.shapes[i])?;
    }
    let n_moe = cfg.n_layers - cfg.first_dense_layers;
    let bias = (0..n_moe)
        .map(|i| f32_tensor(&st, path, &format!("router_bias/{i}"), &[cfg.moe.experts]))
        .collect::<Result<Vec<_>>>()?;
    let optimizer = match meta.get("optimizer") {
        Some(text) => {
            let ocfg: AdamWConfig = toml::from_str(text).map_err(|e| err(path, format!("optimizer config: {e}")))?;
            let step = meta
                .get("step")
                .and_then(|s| s.parse().ok())
                .ok_or_else(|| err(path, "optimizer saved without a valid step"))?;
            let mut opt = AdamW::new(ocfg, &params).map_err(|e| err(path, format!("optimizer config: {e}")))?;
            opt.step = step;
            for i in 0..params.names.len() {
                opt.m.data[i] = f32_tensor(&st, path, &format!("adam_m/{}", params.names[i]), &params.shapes[i])?;
                opt.v.data[i] = f32_tensor(&st, path, &format!("adam_v/{}", params.names[i]), &params.shapes[i])?;
            }
            Some(opt)
        }
        None => None,
    };
    let rng = match st.tensor("rng") {
        Ok(t) if t.dtype() == Dtype::U64 && t.shape() == [4] => {
            let s: Vec<u64> =
                t.data().chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().unwrap_or([0; 8]))).collect();
            Some(Rng::from_state([s[0], s[1], s[2], s[3]]).ok_or_else(|| err(path, "RNG state is all zero"))?)
        }
        Ok(_) => return Err(err(path, "tensor rng: expected U64 [4]")),
        Err(_) => None,
    };
    let extra = meta.iter().filter_map(|(k, v)| k.strip_prefix("extra.").map(|k| (k.to_string(), v.clone()))).collect();
    let model = Model::from_parts(cfg, params, bias).map_err(|e| err(path, e.to_string()))?;
    Ok(Checkpoint { model, optimizer, rng, extra })
}
