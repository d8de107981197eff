//! Memory-mapped safetensors checkpoints exactly as the hub ships them: one `model.safetensors`, or
//! shards listed in `model.safetensors.index.json`. Keys are used as they are (no conversion step).
//!
//! Nothing is read until a tensor is asked for, and a caller may ask for a slice of the first
//! dimension only (an expert worker reads its experts' rows of the fused expert tensors and nothing
//! else): pages of the file that are never touched never become resident.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

use candle_core::{DType, Device, Tensor};
use memmap2::Mmap;
use safetensors::{Dtype, SafeTensors};

use crate::error::{Error, Result};
use crate::quant::compressed::{self, CompressedTensors};

/// Where model weights come from: a checkpoint on disk, or generated ones (benchmarks, `gen-model`).
pub trait WeightSource {
    /// The whole tensor `key`, checked against `shape`, converted to `dtype` on `device`.
    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor>;

    /// Rows `start..start + len` of the first dimension of `key` (whose full shape must be `shape`).
    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor>;

    /// The matrix `key` (an `nn.Linear` weight, `….weight`, `[out, in]` = `shape`) when the source
    /// stores it pre-quantized (compressed-tensors: see [`crate::quant::compressed`]); `None` when
    /// it is stored as plain floats.
    fn quantized(&self, key: &str, shape: (usize, usize)) -> Result<Option<crate::quant::QuantMatrix>> {
        let _ = (key, shape);
        Ok(None)
    }

    /// The dtype `key` is stored in (`None` when unknown or not a float type candle reads).
    fn stored_dtype(&self, key: &str) -> Option<DType> {
        let _ = key;
        None
    }

    /// Bytes of stored data in the source, for progress reports (`None` when unknown).
    fn total_bytes(&self) -> Option<u64> {
        None
    }

    /// Bytes of stored data read so far through [`WeightSource::tensor`] and [`WeightSource::rows`].
    fn bytes_read(&self) -> u64 {
        0
    }
}

#[derive(Debug)]
struct TensorEntry {
    file: usize,
    dtype: Dtype,
    shape: Vec<usize>,
    /// Absolute byte range in the mapped file.
    start: usize,
    end: usize,
}

/// A checkpoint directory with its safetensors files mapped.
#[derive(Debug)]
pub struct Checkpoint {
    dir: PathBuf,
    files: Vec<(PathBuf, Mmap)>,
    tensors: HashMap<String, TensorEntry>,
    bytes_read: AtomicU64,
    /// The pre-quantized format `config.json`'s `quantization_config` declares, if any.
    quantization: Option<CompressedTensors>,
}

impl Checkpoint {
    pub fn open(dir: &Path) -> Result<Self> {
        let index_path = dir.join("model.safetensors.index.json");
        let single = dir.join("model.safetensors");
        let file_names: Vec<String> = if index_path.exists() {
            let text = std::fs::read_to_string(&index_path)
                .map_err(|source| Error::Io { path: index_path.clone(), source })?;
            let index: serde_json::Value = serde_json::from_str(&text)
                .map_err(|e| Error::checkpoint(&index_path, format!("not valid JSON: {e}")))?;
            let map = index
                .get("weight_map")
                .and_then(|m| m.as_object())
                .ok_or_else(|| Error::checkpoint(&index_path, "no `weight_map` object"))?;
            let mut names: Vec<String> = map.values().filter_map(|v| v.as_str().map(str::to_owned)).collect();
            if names.len() != map.len() {
                return Err(Error::checkpoint(&index_path, "`weight_map` values must be file names"));
            }
            names.sort();
            names.dedup();
            names
        } else if single.exists() {
            vec!["model.safetensors".to_owned()]
        } else {
            return Err(Error::checkpoint(dir, "neither model.safetensors nor model.safetensors.index.json found"));
        };

        let mut files = Vec::with_capacity(file_names.len());
        let mut tensors = HashMap::new();
        for (file_idx, name) in file_names.iter().enumerate() {
            if name.contains('/') || name.contains("..") {
                return Err(Error::checkpoint(&index_path, format!("shard name `{name}` leaves the directory")));
            }
            let path = dir.join(name);
            let file = std::fs::File::open(&path).map_err(|source| Error::Io { path: path.clone(), source })?;
            // SAFETY: the map is read-only; the checkpoint must not be modified while it is served,
            // as for every mmap-based loader (documented in docs/operations.md).
            let mmap = unsafe { Mmap::map(&file) }.map_err(|source| Error::Io { path: path.clone(), source })?;
            let (header_len, metadata) = SafeTensors::read_metadata(&mmap)
                .map_err(|e| Error::checkpoint(&path, format!("bad safetensors header: {e}")))?;
            let data_start = 8 + header_len;
            for (key, info) in metadata.tensors() {
                let entry = TensorEntry {
                    file: file_idx,
                    dtype: info.dtype,
                    shape: info.shape.clone(),
                    start: data_start + info.data_offsets.0,
                    end: data_start + info.data_offsets.1,
                };
                if tensors.insert(key.clone(), entry).is_some() {
                    return Err(Error::checkpoint(&path, format!("tensor `{key}` appears in two shards")));
                }
            }
            files.push((path, mmap));
        }
        let quantization = Self::quantization_config(dir)?;
        Ok(Checkpoint { dir: dir.to_owned(), files, tensors, bytes_read: AtomicU64::new(0), quantization })
    }

    /// The `quantization_config` of `dir/config.json` (checked here, so that a scheme this loader
    /// cannot read is refused before anything is loaded). No config file: no quantization.
    fn quantization_config(dir: &Path) -> Result<Option<CompressedTensors>> {
        let path = dir.join("config.json");
        let Ok(text) = std::fs::read_to_string(&path) else { return Ok(None) };
        let config: serde_json::Value =
            serde_json::from_str(&text).map_err(|e| Error::checkpoint(&path, format!("not valid JSON: {e}")))?;
        match config.get("quantization_config") {
            None | Some(serde_json::Value::Null) => Ok(None),
            Some(q) => CompressedTensors::parse(q).map(Some).map_err(|why| Error::checkpoint(&path, why)),
        }
    }

    /// The pre-quantized scheme of the checkpoint, if any (e.g. for `Status`).
    pub fn quantization(&self) -> Option<&CompressedTensors> {
        self.quantization.as_ref()
    }

    fn raw(&self, key: &str) -> Option<compressed::Raw<'_>> {
        let e = self.tensors.get(key)?;
        Some(compressed::Raw { dtype: e.dtype, shape: &e.shape, bytes: &self.files[e.file].1[e.start..e.end] })
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn contains(&self, key: &str) -> bool {
        self.tensors.contains_key(key)
    }

    pub fn keys(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// Stored shape of `key`, if present.
    pub fn shape(&self, key: &str) -> Option<&[usize]> {
        self.tensors.get(key).map(|e| e.shape.as_slice())
    }

    fn entry(&self, key: &str, shape: &[usize]) -> Result<&TensorEntry> {
        let entry = self
            .tensors
            .get(key)
            .ok_or_else(|| Error::MissingTensor { key: key.to_owned(), where_: self.dir.display().to_string() })?;
        if entry.shape != shape {
            return Err(Error::ShapeMismatch {
                key: key.to_owned(),
                expected: shape.to_vec(),
                found: entry.shape.clone(),
            });
        }
        Ok(entry)
    }

    fn convert(
        key: &str,
        entry: &TensorEntry,
        bytes: &[u8],
        shape: &[usize],
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let stored = match entry.dtype {
            Dtype::BF16 => DType::BF16,
            Dtype::F16 => DType::F16,
            Dtype::F32 => DType::F32,
            other => return Err(Error::UnsupportedDtype { key: key.to_owned(), dtype: format!("{other:?}") }),
        };
        let t = Tensor::from_raw_buffer(bytes, stored, shape, device)?;
        Ok(if stored == dtype { t } else { t.to_dtype(dtype)? })
    }
}

impl WeightSource for Checkpoint {
    fn quantized(&self, key: &str, shape: (usize, usize)) -> Result<Option<crate::quant::QuantMatrix>> {
        let Some(ct) = &self.quantization else { return Ok(None) };
        let base = key.strip_suffix("weight").unwrap_or(key);
        let found = compressed::load(ct, base, shape, |name| self.raw(name))
            .map_err(|why| Error::checkpoint(&self.dir, why))?;
        if let Some(q) = &found {
            self.bytes_read.fetch_add(q.bytes(), Ordering::Relaxed);
        }
        Ok(found)
    }

    fn tensor(&self, key: &str, shape: &[usize], dtype: DType, device: &Device) -> Result<Tensor> {
        let entry = self.entry(key, shape)?;
        let bytes = &self.files[entry.file].1[entry.start..entry.end];
        self.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        Self::convert(key, entry, bytes, shape, dtype, device)
    }

    fn rows(
        &self,
        key: &str,
        shape: &[usize],
        start: usize,
        len: usize,
        dtype: DType,
        device: &Device,
    ) -> Result<Tensor> {
        let entry = self.entry(key, shape)?;
        let Some((&first, rest)) = shape.split_first() else {
            return Err(Error::Input(format!("`{key}` is a scalar; it has no rows")));
        };
        if start + len > first {
            return Err(Error::Input(format!("rows {start}..{} of `{key}`, which has {first}", start + len)));
        }
        let row_bytes = rest.iter().product::<usize>() * entry.dtype.bitsize() / 8;
        let from = entry.start + start * row_bytes;
        let bytes = &self.files[entry.file].1[from..from + len * row_bytes];
        self.bytes_read.fetch_add(bytes.len() as u64, Ordering::Relaxed);
        let mut sub_shape = shape.to_vec();
        sub_shape[0] = len;
        Self::convert(key, entry, bytes, &sub_shape, dtype, device)
    }

    fn stored_dtype(&self, key: &str) -> Option<DType> {
        match self.tensors.get(key)?.dtype {
            Dtype::BF16 => Some(DType::BF16),
            Dtype::F16 => Some(DType::F16),
            Dtype::F32 => Some(DType::F32),
            _ => None,
        }
    }

    fn total_bytes(&self) -> Option<u64> {
        Some(self.tensors.values().map(|e| (e.end - e.start) as u64).sum())
    }

    fn bytes_read(&self) -> u64 {
        self.bytes_read.load(Ordering::Relaxed)
    }
}

/// Writes `tensors` as a hub-layout checkpoint in `dir`: one `model.safetensors` when
/// `shard_bytes` is `None`, else `model-0000i-of-0000n.safetensors` shards of about that size with
/// `model.safetensors.index.json`. Used by `gen-model` and by tests that need a sharded copy.
pub fn write_checkpoint(dir: &Path, tensors: &[(String, Tensor)], shard_bytes: Option<usize>) -> Result<()> {
    let mut shards: Vec<Vec<&(String, Tensor)>> = vec![Vec::new()];
    let mut current = 0usize;
    for entry in tensors {
        let size = entry.1.elem_count() * entry.1.dtype().size_in_bytes();
        if let Some(limit) = shard_bytes
            && current > 0
            && current + size > limit
        {
            shards.push(Vec::new());
            current = 0;
        }
        current += size;
        if let Some(shard) = shards.last_mut() {
            shard.push(entry);
        }
    }
    let mut metadata = HashMap::new();
    metadata.insert("format".to_owned(), "pt".to_owned());
    if shard_bytes.is_none() {
        let path = dir.join("model.safetensors");
        let views = tensors.iter().map(|(k, t)| Ok((k.as_str(), TensorBytes::new(t)?))).collect::<Result<Vec<_>>>()?;
        return safetensors::serialize_to_file(views, Some(metadata), &path)
            .map_err(|e| Error::checkpoint(&path, e.to_string()));
    }
    let n = shards.len();
    let mut weight_map = serde_json::Map::new();
    let mut total = 0usize;
    for (i, shard) in shards.iter().enumerate() {
        let name = format!("model-{:05}-of-{:05}.safetensors", i + 1, n);
        let path = dir.join(&name);
        let views = shard.iter().map(|(k, t)| Ok((k.as_str(), TensorBytes::new(t)?))).collect::<Result<Vec<_>>>()?;
        for (k, t) in shard.iter().map(|e| (&e.0, &e.1)) {
            weight_map.insert(k.clone(), serde_json::Value::String(name.clone()));
            total += t.elem_count() * t.dtype().size_in_bytes();
        }
        safetensors::serialize_to_file(views, Some(metadata.clone()), &path)
            .map_err(|e| Error::checkpoint(&path, e.to_string()))?;
    }
    let index = serde_json::json!({ "metadata": { "total_size": total }, "weight_map": weight_map });
    let path = dir.join("model.safetensors.index.json");
    std::fs::write(&path, serde_json::to_string_pretty(&index).unwrap_or_default())
        .map_err(|source| Error::Io { path, source })
}

/// A candle tensor's bytes in the shape safetensors wants.
struct TensorBytes {
    dtype: Dtype,
    shape: Vec<usize>,
    data: Vec<u8>,
}

impl TensorBytes {
    fn new(t: &Tensor) -> Result<Self> {
        let shape = t.dims().to_vec();
        let flat = t.flatten_all()?;
        let (dtype, data) = match flat.dtype() {
            DType::BF16 => (Dtype::BF16, flat.to_vec1::<half::bf16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F16 => (Dtype::F16, flat.to_vec1::<half::f16>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            DType::F32 => (Dtype::F32, flat.to_vec1::<f32>()?.iter().flat_map(|v| v.to_le_bytes()).collect()),
            other => return Err(Error::Input(format!("cannot write dtype {other:?}"))),
        };
        Ok(TensorBytes { dtype, shape, data })
    }
}

impl safetensors::View for TensorBytes {
    fn dtype(&self) -> Dtype {
        self.dtype
    }
    fn shape(&self) -> &[usize] {
        &self.shape
    }
    fn data(&self) -> std::borrow::Cow<'_, [u8]> {
        std::borrow::Cow::Borrowed(&self.data)
    }
    fn data_len(&self) -> usize {
        self.data.len()
    }
}
