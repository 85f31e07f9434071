//! Reading GGUF files: header, metadata and tensor directory, with typed errors.
//!
//! We parse GGUF ourselves rather than through `candle_core::quantized::gguf_file`
//! because a model file is untrusted input: Candle's reader allocates whatever a
//! length field claims (a corrupt string length aborts the process) and reports
//! truncation only when a tensor is finally read. Here every length is checked
//! against the bytes that are really there before anything is allocated, every
//! tensor's extent is checked against the file size when the file is opened, and
//! each failure names the file and the reason ([`ModelFileError`]).
//!
//! The file is memory-mapped; tensors are copied out of the map into Candle's own
//! storage (`QStorage::from_data`) one at a time, so nothing but the header is
//! ever held twice.

use std::collections::HashMap;
use std::fmt;
use std::fs::File;
use std::path::{Path, PathBuf};

use candle_core::quantized::{GgmlDType, QStorage, QTensor};
use candle_core::Device;

use super::error::{EngineError, ModelFileError};

const MAGIC: &[u8; 4] = b"GGUF";
const DEFAULT_ALIGNMENT: u64 = 32;

/// One metadata value. Arrays keep their element type so that an empty array is
/// still typed.
#[derive(Debug, Clone, PartialEq)]
pub enum Value {
    U8(u8),
    I8(i8),
    U16(u16),
    I16(i16),
    U32(u32),
    I32(i32),
    U64(u64),
    I64(i64),
    F32(f32),
    F64(f64),
    Bool(bool),
    String(String),
    Array(Vec<Value>),
}

impl Value {
    fn type_name(&self) -> &'static str {
        match self {
            Value::U8(_) => "u8",
            Value::I8(_) => "i8",
            Value::U16(_) => "u16",
            Value::I16(_) => "i16",
            Value::U32(_) => "u32",
            Value::I32(_) => "i32",
            Value::U64(_) => "u64",
            Value::I64(_) => "i64",
            Value::F32(_) => "f32",
            Value::F64(_) => "f64",
            Value::Bool(_) => "bool",
            Value::String(_) => "string",
            Value::Array(_) => "array",
        }
    }

    /// Any integer type that fits, as llama.cpp accepts (writers differ on u32/i32/u64).
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            Value::U8(v) => Some(v.into()),
            Value::U16(v) => Some(v.into()),
            Value::U32(v) => Some(v.into()),
            Value::U64(v) => Some(v),
            Value::I8(v) => u64::try_from(v).ok(),
            Value::I16(v) => u64::try_from(v).ok(),
            Value::I32(v) => u64::try_from(v).ok(),
            Value::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            Value::F32(v) => Some(v.into()),
            Value::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            Value::String(s) => Some(s),
            _ => None,
        }
    }
}

/// Where a tensor lives in the file and what it is.
#[derive(Debug, Clone)]
pub struct TensorInfo {
    /// Candle order: outermost dimension first (GGUF stores them innermost first).
    pub shape: Vec<usize>,
    pub dtype: GgmlDType,
    /// Absolute byte offset in the file.
    pub offset: usize,
    pub size: usize,
}

/// An open GGUF file: parsed metadata and tensor directory over a memory map.
pub struct GgufFile {
    path: PathBuf,
    map: memmap2::Mmap,
    pub version: u32,
    metadata: HashMap<String, Value>,
    tensors: HashMap<String, TensorInfo>,
}

impl fmt::Debug for GgufFile {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("GgufFile")
            .field("path", &self.path)
            .field("version", &self.version)
            .field("metadata", &self.metadata.len())
            .field("tensors", &self.tensors.len())
            .finish()
    }
}

impl GgufFile {
    /// Open and validate a GGUF file. Fails with [`EngineError::ModelFile`] naming
    /// the file for anything that is not a well-formed GGUF whose tensors all lie
    /// inside the file.
    pub fn open(path: &Path) -> Result<Self, EngineError> {
        let file = File::open(path).map_err(|source| EngineError::Io {
            path: path.to_owned(),
            source,
        })?;
        // SAFETY: the map is read-only and private to this process. Like every
        // mmap-based loader (llama.cpp, safetensors) we assume the file is not
        // truncated underneath us while it is open.
        let map = unsafe { memmap2::MmapOptions::new().map(&file) }.map_err(|source| {
            EngineError::Io {
                path: path.to_owned(),
                source,
            }
        })?;
        let fail = |reason| EngineError::ModelFile {
            path: path.to_owned(),
            reason,
        };
        let (version, metadata, tensors) = parse(&map).map_err(fail)?;
        Ok(Self {
            path: path.to_owned(),
            map,
            version,
            metadata,
            tensors,
        })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn metadata(&self) -> &HashMap<String, Value> {
        &self.metadata
    }

    pub fn tensor_info(&self, name: &str) -> Option<&TensorInfo> {
        self.tensors.get(name)
    }

    pub fn tensor_names(&self) -> impl Iterator<Item = &str> {
        self.tensors.keys().map(String::as_str)
    }

    /// An error about this file.
    pub fn error(&self, reason: ModelFileError) -> EngineError {
        EngineError::ModelFile {
            path: self.path.clone(),
            reason,
        }
    }

    pub fn get(&self, key: &str) -> Option<&Value> {
        self.metadata.get(key)
    }

    fn require(&self, key: &str) -> Result<&Value, EngineError> {
        self.get(key)
            .ok_or_else(|| self.error(ModelFileError::MissingKey(key.to_owned())))
    }

    fn wrong_type(&self, key: &str, expected: &'static str, v: &Value) -> EngineError {
        self.error(ModelFileError::WrongType {
            key: key.to_owned(),
            expected,
            found: v.type_name(),
        })
    }

    pub fn get_u64(&self, key: &str) -> Result<u64, EngineError> {
        let v = self.require(key)?;
        v.as_u64()
            .ok_or_else(|| self.wrong_type(key, "unsigned integer", v))
    }

    pub fn get_usize(&self, key: &str) -> Result<usize, EngineError> {
        let v = self.get_u64(key)?;
        usize::try_from(v).map_err(|_| {
            self.error(ModelFileError::Malformed(format!(
                "`{key}` = {v} is out of range"
            )))
        })
    }

    pub fn get_f64(&self, key: &str) -> Result<f64, EngineError> {
        let v = self.require(key)?;
        v.as_f64().ok_or_else(|| self.wrong_type(key, "number", v))
    }

    pub fn get_str(&self, key: &str) -> Result<&str, EngineError> {
        let v = self.require(key)?;
        v.as_str().ok_or_else(|| self.wrong_type(key, "string", v))
    }

    pub fn get_bool(&self, key: &str) -> Result<bool, EngineError> {
        match self.require(key)? {
            Value::Bool(b) => Ok(*b),
            v => Err(self.wrong_type(key, "bool", v)),
        }
    }

    pub fn get_array(&self, key: &str) -> Result<&[Value], EngineError> {
        match self.require(key)? {
            Value::Array(a) => Ok(a),
            v => Err(self.wrong_type(key, "array", v)),
        }
    }

    /// `general.architecture`, the key every loader dispatches on.
    pub fn architecture(&self) -> Result<&str, EngineError> {
        self.get_str("general.architecture")
    }

    /// Raw bytes of a tensor, straight from the map.
    pub fn tensor_bytes(&self, name: &str) -> Result<&[u8], EngineError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| self.error(ModelFileError::MissingTensor(name.to_owned())))?;
        Ok(&self.map[info.offset..info.offset + info.size])
    }

    /// The matrices `names` (each `[rows_i, cols]`, as `shapes` says) stacked
    /// row-wise into one `[sum rows_i, cols]` tensor on `device`, when they
    /// share a type: one matmul then does the work of several (a GGUF
    /// matrix is stored row after row, so stacking is concatenating bytes).
    /// `None` when a type differs; an error when one is missing or misshapen.
    pub fn stacked(
        &self,
        names: &[&str],
        shapes: &[[usize; 2]],
        device: &Device,
    ) -> Result<Option<QTensor>, EngineError> {
        let mut bytes = Vec::new();
        let mut dtype = None;
        for (name, shape) in names.iter().zip(shapes) {
            let info = self
                .tensors
                .get(*name)
                .ok_or_else(|| self.error(ModelFileError::MissingTensor((*name).to_owned())))?;
            if info.shape != shape {
                return Err(self.error(ModelFileError::BadShape {
                    name: (*name).to_owned(),
                    expected: shape.to_vec(),
                    found: info.shape.clone(),
                }));
            }
            if dtype.is_some_and(|d| d != info.dtype) || shape[1] != shapes[0][1] {
                return Ok(None);
            }
            dtype = Some(info.dtype);
            bytes.extend_from_slice(&self.map[info.offset..info.offset + info.size]);
        }
        let Some(dtype) = dtype else { return Ok(None) };
        let rows: usize = shapes.iter().map(|s| s[0]).sum();
        let storage = QStorage::from_data(bytes.into(), device, dtype)?;
        Ok(Some(QTensor::new(storage, (rows, shapes[0][1]))?))
    }

    /// Load a tensor onto `device`, checking its shape when `expected` is given.
    pub fn tensor(
        &self,
        name: &str,
        expected: Option<&[usize]>,
        device: &Device,
    ) -> Result<QTensor, EngineError> {
        let info = self
            .tensors
            .get(name)
            .ok_or_else(|| self.error(ModelFileError::MissingTensor(name.to_owned())))?;
        if let Some(expected) = expected {
            if info.shape != expected {
                return Err(self.error(ModelFileError::BadShape {
                    name: name.to_owned(),
                    expected: expected.to_vec(),
                    found: info.shape.clone(),
                }));
            }
        }
        let bytes = &self.map[info.offset..info.offset + info.size];
        let storage = QStorage::from_data(bytes.into(), device, info.dtype)?;
        Ok(QTensor::new(storage, info.shape.as_slice())?)
    }
}

/// GGUF tensor type ids that Candle can hold (ggml.h `enum ggml_type`).
fn ggml_dtype(id: u32) -> Option<GgmlDType> {
    Some(match id {
        0 => GgmlDType::F32,
        1 => GgmlDType::F16,
        2 => GgmlDType::Q4_0,
        3 => GgmlDType::Q4_1,
        6 => GgmlDType::Q5_0,
        7 => GgmlDType::Q5_1,
        8 => GgmlDType::Q8_0,
        9 => GgmlDType::Q8_1,
        10 => GgmlDType::Q2K,
        11 => GgmlDType::Q3K,
        12 => GgmlDType::Q4K,
        13 => GgmlDType::Q5K,
        14 => GgmlDType::Q6K,
        15 => GgmlDType::Q8K,
        30 => GgmlDType::BF16,
        _ => return None,
    })
}

type Parsed = (u32, HashMap<String, Value>, HashMap<String, TensorInfo>);

/// A bounds-checked little-endian cursor over the file.
struct Cursor<'a> {
    buf: &'a [u8],
    pos: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8], ModelFileError> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(ModelFileError::Truncated {
                what: what.to_owned(),
                needed: self.pos as u64 + n as u64,
                len: self.buf.len() as u64,
            });
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N], ModelFileError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, what)?);
        Ok(out)
    }

    fn u32(&mut self, what: &str) -> Result<u32, ModelFileError> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    fn u64(&mut self, what: &str) -> Result<u64, ModelFileError> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A count that is about to size an allocation: it must be plausible given the
    /// bytes left, each element taking at least `min_elem` bytes.
    fn count(&mut self, what: &str, min_elem: usize) -> Result<usize, ModelFileError> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(min_elem as u64) > left {
            return Err(ModelFileError::Truncated {
                what: format!("{what} ({n} entries)"),
                needed: (self.pos as u64).saturating_add(n.saturating_mul(min_elem as u64)),
                len: self.buf.len() as u64,
            });
        }
        Ok(n as usize)
    }

    fn string(&mut self, what: &str) -> Result<String, ModelFileError> {
        let n = self.count(what, 1)?;
        let bytes = self.take(n, what)?;
        // llama.cpp writes arbitrary bytes in some vocabularies; keep them lossily
        // rather than refusing the model.
        Ok(String::from_utf8_lossy(bytes).into_owned())
    }

    fn value(&mut self, ty: u32, what: &str, depth: u32) -> Result<Value, ModelFileError> {
        Ok(match ty {
            0 => Value::U8(self.array::<1>(what)?[0]),
            1 => Value::I8(self.array::<1>(what)?[0] as i8),
            2 => Value::U16(u16::from_le_bytes(self.array(what)?)),
            3 => Value::I16(i16::from_le_bytes(self.array(what)?)),
            4 => Value::U32(self.u32(what)?),
            5 => Value::I32(i32::from_le_bytes(self.array(what)?)),
            6 => Value::F32(f32::from_le_bytes(self.array(what)?)),
            7 => match self.array::<1>(what)?[0] {
                0 => Value::Bool(false),
                1 => Value::Bool(true),
                b => {
                    return Err(ModelFileError::Malformed(format!(
                        "{what}: bool byte {b} is neither 0 nor 1"
                    )))
                }
            },
            8 => Value::String(self.string(what)?),
            9 => {
                if depth > 4 {
                    return Err(ModelFileError::Malformed(format!(
                        "{what}: arrays nested too deeply"
                    )));
                }
                let elem_ty = self.u32(what)?;
                let n = self.count(what, elem_min_size(elem_ty))?;
                let mut items = Vec::with_capacity(n);
                for _ in 0..n {
                    items.push(self.value(elem_ty, what, depth + 1)?);
                }
                Value::Array(items)
            }
            10 => Value::U64(self.u64(what)?),
            11 => Value::I64(i64::from_le_bytes(self.array(what)?)),
            12 => Value::F64(f64::from_le_bytes(self.array(what)?)),
            t => {
                return Err(ModelFileError::Malformed(format!(
                    "{what}: unknown metadata value type {t}"
                )))
            }
        })
    }
}

/// The fewest bytes one element of a metadata type can take (so a claimed count
/// can be checked against what is left before allocating).
fn elem_min_size(ty: u32) -> usize {
    match ty {
        0 | 1 | 7 => 1,
        2 | 3 => 2,
        4..=6 => 4,
        8 => 8,
        9 => 12,
        _ => 8,
    }
}

fn parse(buf: &[u8]) -> Result<Parsed, ModelFileError> {
    let mut c = Cursor { buf, pos: 0 };
    if buf.len() < 4 || &buf[..4] != MAGIC {
        let mut found = [0u8; 4];
        let n = buf.len().min(4);
        found[..n].copy_from_slice(&buf[..n]);
        return Err(ModelFileError::NotGguf { found });
    }
    c.pos = 4;
    let version = c.u32("header")?;
    if !(2..=3).contains(&version) {
        return Err(ModelFileError::UnsupportedVersion(version));
    }
    // Each tensor info takes at least 8 (name) + 4 + 8 + 4 + 8 bytes; each key/value 8 + 4 + 1.
    let n_tensors = c.count("tensor count", 32)?;
    let n_kv = c.count("metadata count", 13)?;

    let mut metadata = HashMap::with_capacity(n_kv);
    for _ in 0..n_kv {
        let key = c.string("metadata key")?;
        let ty = c.u32(&key)?;
        let value = c.value(ty, &key, 0)?;
        metadata.insert(key, value);
    }

    let alignment = match metadata.get("general.alignment") {
        None => DEFAULT_ALIGNMENT,
        Some(v) => match v.as_u64() {
            Some(a) if a > 0 && a.is_power_of_two() => a,
            _ => {
                return Err(ModelFileError::Malformed(format!(
                    "general.alignment {v:?} is not a power of two"
                )))
            }
        },
    };

    let mut raw = Vec::with_capacity(n_tensors);
    for _ in 0..n_tensors {
        let name = c.string("tensor name")?;
        let n_dims = c.u32(&name)? as usize;
        if n_dims == 0 || n_dims > 4 {
            return Err(ModelFileError::Malformed(format!(
                "tensor `{name}` has {n_dims} dimensions"
            )));
        }
        let mut dims = Vec::with_capacity(n_dims);
        for _ in 0..n_dims {
            dims.push(c.u64(&name)?);
        }
        let ty = c.u32(&name)?;
        let offset = c.u64(&name)?;
        raw.push((name, dims, ty, offset));
    }
    let data_start = (c.pos as u64).div_ceil(alignment) * alignment;

    let mut tensors = HashMap::with_capacity(raw.len());
    for (name, dims, ty, offset) in raw {
        let dtype = ggml_dtype(ty).ok_or_else(|| ModelFileError::UnsupportedTensorType {
            name: name.clone(),
            type_id: ty,
        })?;
        let elems = dims
            .iter()
            .try_fold(1u64, |acc, &d| acc.checked_mul(d))
            .filter(|&e| e > 0)
            .ok_or_else(|| {
                ModelFileError::Malformed(format!("tensor `{name}` has dimensions {dims:?}"))
            })?;
        let block = dtype.block_size() as u64;
        if dims[0] % block != 0 {
            return Err(ModelFileError::Malformed(format!(
                "tensor `{name}`: row of {} elements is not a whole number of {dtype:?} blocks",
                dims[0]
            )));
        }
        let size = elems / block * dtype.type_size() as u64;
        if offset % alignment != 0 {
            return Err(ModelFileError::Malformed(format!(
                "tensor `{name}` at data offset {offset} is not {alignment}-byte aligned"
            )));
        }
        let start = data_start.checked_add(offset);
        let end = start.and_then(|s| s.checked_add(size));
        match end {
            Some(end) if end <= buf.len() as u64 => {}
            _ => {
                return Err(ModelFileError::Truncated {
                    what: format!("tensor `{name}`"),
                    needed: end.unwrap_or(u64::MAX),
                    len: buf.len() as u64,
                })
            }
        }
        let shape = dims.iter().rev().map(|&d| d as usize).collect();
        let info = TensorInfo {
            shape,
            dtype,
            offset: (data_start + offset) as usize,
            size: size as usize,
        };
        if tensors.insert(name.clone(), info).is_some() {
            return Err(ModelFileError::Malformed(format!(
                "tensor `{name}` appears twice"
            )));
        }
    }
    Ok((version, metadata, tensors))
}

/// A tensor to write: name, type, shape in Candle order, and its raw bytes.
#[derive(Debug, Clone)]
pub struct TensorData {
    pub name: String,
    pub dtype: GgmlDType,
    pub shape: Vec<usize>,
    pub data: Vec<u8>,
}

fn ggml_type_id(dtype: GgmlDType) -> u32 {
    match dtype {
        GgmlDType::F32 => 0,
        GgmlDType::F16 => 1,
        GgmlDType::Q4_0 => 2,
        GgmlDType::Q4_1 => 3,
        GgmlDType::Q5_0 => 6,
        GgmlDType::Q5_1 => 7,
        GgmlDType::Q8_0 => 8,
        GgmlDType::Q8_1 => 9,
        GgmlDType::Q2K => 10,
        GgmlDType::Q3K => 11,
        GgmlDType::Q4K => 12,
        GgmlDType::Q5K => 13,
        GgmlDType::Q6K => 14,
        GgmlDType::Q8K => 15,
        GgmlDType::BF16 => 30,
    }
}

fn value_type_id(v: &Value) -> u32 {
    match v {
        Value::U8(_) => 0,
        Value::I8(_) => 1,
        Value::U16(_) => 2,
        Value::I16(_) => 3,
        Value::U32(_) => 4,
        Value::I32(_) => 5,
        Value::F32(_) => 6,
        Value::Bool(_) => 7,
        Value::String(_) => 8,
        Value::Array(_) => 9,
        Value::U64(_) => 10,
        Value::I64(_) => 11,
        Value::F64(_) => 12,
    }
}

fn write_value(w: &mut impl std::io::Write, v: &Value) -> std::io::Result<()> {
    match v {
        Value::U8(x) => w.write_all(&[*x]),
        Value::I8(x) => w.write_all(&x.to_le_bytes()),
        Value::U16(x) => w.write_all(&x.to_le_bytes()),
        Value::I16(x) => w.write_all(&x.to_le_bytes()),
        Value::U32(x) => w.write_all(&x.to_le_bytes()),
        Value::I32(x) => w.write_all(&x.to_le_bytes()),
        Value::U64(x) => w.write_all(&x.to_le_bytes()),
        Value::I64(x) => w.write_all(&x.to_le_bytes()),
        Value::F32(x) => w.write_all(&x.to_le_bytes()),
        Value::F64(x) => w.write_all(&x.to_le_bytes()),
        Value::Bool(x) => w.write_all(&[u8::from(*x)]),
        Value::String(s) => {
            w.write_all(&(s.len() as u64).to_le_bytes())?;
            w.write_all(s.as_bytes())
        }
        Value::Array(items) => {
            // An empty array is written as an array of u32.
            let ty = items.first().map_or(4, value_type_id);
            w.write_all(&ty.to_le_bytes())?;
            w.write_all(&(items.len() as u64).to_le_bytes())?;
            items.iter().try_for_each(|i| write_value(w, i))
        }
    }
}

/// What the tensor directory says about a tensor to be written.
#[derive(Debug, Clone)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: GgmlDType,
    /// Candle order: outermost dimension first.
    pub shape: Vec<usize>,
}

impl TensorHeader {
    /// Bytes of data this tensor takes.
    pub fn size(&self) -> usize {
        let elems: usize = self.shape.iter().product();
        elems / self.dtype.block_size() * self.dtype.type_size()
    }
}

/// Write a GGUF v3 file (32-byte alignment), as llama.cpp's writer lays it out.
pub fn write(
    w: &mut impl std::io::Write,
    metadata: &[(String, Value)],
    tensors: &[TensorData],
) -> std::io::Result<()> {
    let headers: Vec<TensorHeader> = tensors
        .iter()
        .map(|t| TensorHeader {
            name: t.name.clone(),
            dtype: t.dtype,
            shape: t.shape.clone(),
        })
        .collect();
    write_streaming(w, metadata, &headers, |i, w| w.write_all(&tensors[i].data))
}

/// Write a GGUF v3 file whose tensor data comes from `data(i, w)`, which must
/// write exactly `headers[i].size()` bytes: files larger than memory can be
/// generated on the fly.
pub fn write_streaming<W: std::io::Write>(
    w: &mut W,
    metadata: &[(String, Value)],
    headers: &[TensorHeader],
    mut data: impl FnMut(usize, &mut W) -> std::io::Result<()>,
) -> std::io::Result<()> {
    let mut head = Vec::new();
    head.extend_from_slice(MAGIC);
    head.extend_from_slice(&3u32.to_le_bytes());
    head.extend_from_slice(&(headers.len() as u64).to_le_bytes());
    head.extend_from_slice(&(metadata.len() as u64).to_le_bytes());
    for (k, v) in metadata {
        write_value(&mut head, &Value::String(k.clone()))?;
        head.extend_from_slice(&value_type_id(v).to_le_bytes());
        write_value(&mut head, v)?;
    }
    let align = DEFAULT_ALIGNMENT as usize;
    let mut offset = 0usize;
    for t in headers {
        write_value(&mut head, &Value::String(t.name.clone()))?;
        head.extend_from_slice(&(t.shape.len() as u32).to_le_bytes());
        for d in t.shape.iter().rev() {
            head.extend_from_slice(&(*d as u64).to_le_bytes());
        }
        head.extend_from_slice(&ggml_type_id(t.dtype).to_le_bytes());
        head.extend_from_slice(&(offset as u64).to_le_bytes());
        offset = (offset + t.size()).div_ceil(align) * align;
    }
    head.resize(head.len().div_ceil(align) * align, 0);
    w.write_all(&head)?;
    for (i, t) in headers.iter().enumerate() {
        data(i, w)?;
        let pad = t.size().div_ceil(align) * align - t.size();
        w.write_all(&vec![0u8; pad])?;
    }
    Ok(())
}
