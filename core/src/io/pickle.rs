//! Reading PyTorch zip checkpoints (`pytorch_model.bin`, `torch.save` since
//! PyTorch 1.6) without executing any pickle code.
//!
//! A torch checkpoint is a zip archive holding `<archive>/data.pkl` (the
//! pickled state dict) and one `<archive>/data/<key>` entry per storage,
//! stored uncompressed. This module parses the zip central directory by hand
//! (zip64 included) and runs a *restricted* unpickler: a small stack machine
//! that understands the opcodes `torch.save` emits (protocols 2 to 5) and a
//! fixed list of globals, which it interprets itself instead of importing:
//!
//! * `torch._utils._rebuild_tensor_v2` / `_rebuild_tensor`,
//!   `torch._utils._rebuild_parameter` / `_rebuild_parameter_with_state`,
//!   `torch._tensor._rebuild_from_type_v2` (with `torch.Tensor` or
//!   `torch.nn.parameter.Parameter` as the type);
//! * `collections.OrderedDict` (called with no arguments);
//! * the typed storages `torch.{Float,Double,Half,BFloat16,Long,Int,Short,
//!   Char,Byte,Bool}Storage`, referenced from persistent ids
//!   `('storage', storage_type, key, location, numel)`;
//! * `_codecs.encode` (how protocol 2 pickles `bytes` values).
//!
//! Any other global is an error naming the file and the global. Tensors must
//! be contiguous (any stride on a dimension of size 1 is fine) and their
//! storage entries stored uncompressed; the storage offset is honoured, so
//! tensors sharing one storage (tied weights, views) each get their own byte
//! range. Every [`TensorLoc`] points straight into the `.bin` file, so tensor
//! bytes are read with the same ranged reads as safetensors.

use std::collections::{BTreeMap, HashMap};
use std::rc::Rc;

use crate::dtype::DType;
use crate::error::{Error, Result};
use crate::io::safetensors::TensorLoc;
use crate::io::source::ByteSource;

/// Largest `data.pkl` accepted (a state dict's pickle is a few hundred bytes
/// per tensor; this leaves room for checkpoints with a lot of metadata).
const MAX_PICKLE: u64 = 256 << 20;
/// Largest zip central directory accepted.
const MAX_CENTRAL_DIR: u64 = 256 << 20;
/// Most arguments any known global takes (keeps copies of argument tuples small).
const MAX_ARGS: usize = 8;
/// Most dimensions a torch tensor can have.
const MAX_DIMS: usize = 64;

/// Reads the PyTorch zip checkpoint in `src` (pytorch_model.bin or a shard)
/// and returns, for each tensor, a TensorLoc relative to a ByteSource over
/// the whole .bin file (offset = absolute offset of the tensor's first
/// element inside the zip file; compressed entries and non-contiguous
/// tensors are errors).
///
/// A top-level dict with a `state_dict` entry that is a dict is read through
/// that entry; non-tensor values (ints, strings, nested dicts) are skipped.
/// Errors name the file and, where it applies, the tensor or global.
pub fn read_bin_index(
    src: &dyn ByteSource,
    shard_idx: usize,
) -> Result<BTreeMap<String, TensorLoc>> {
    let file = src.name();
    let zip = Zip::open(src, &file)?;
    let pkl_name = zip.find_data_pkl()?;
    let prefix = pkl_name
        .strip_suffix("data.pkl")
        .unwrap_or_default()
        .to_string();

    if let Some(bo) = zip.entries.get(&format!("{prefix}byteorder")) {
        let b = zip.read_entry(src, &format!("{prefix}byteorder"), bo, 64)?;
        if b.trim_ascii() != b"little" {
            return Err(Error::format(
                &file,
                format!(
                    "checkpoint byte order is {:?}; only little-endian checkpoints are supported",
                    String::from_utf8_lossy(&b)
                ),
            ));
        }
    }

    let pkl_entry = &zip.entries[&pkl_name];
    let pkl = zip.read_entry(src, &pkl_name, pkl_entry, MAX_PICKLE)?;
    let mut vm = Unpickler::new(&pkl, &file, &pkl_name);
    let root = vm.run()?;

    // The state dict: the root, or root["state_dict"] when that is a dict.
    let Value::Dict(root_id) = root else {
        return Err(Error::format(
            &file,
            format!(
                "{pkl_name} holds a {}, not a state dict",
                vm.type_name(&root)
            ),
        ));
    };
    let mut dict_id = root_id;
    if let Some(Value::Dict(inner)) = vm.dict_get(root_id, "state_dict") {
        dict_id = inner;
    }

    // Last assignment of a key wins, as in Python.
    let mut entries: BTreeMap<String, Value> = BTreeMap::new();
    let mut skipped: Vec<String> = Vec::new();
    for (k, v) in &vm.dicts[dict_id] {
        match (k, v) {
            (Value::Str(k), Value::Tensor(_)) => {
                entries.insert(k.to_string(), v.clone());
            }
            (Value::Str(k), _) => skipped.push(k.to_string()),
            (k, Value::Tensor(_)) => {
                return Err(Error::format(
                    &file,
                    format!(
                        "state dict has a tensor under a {} key; keys must be strings",
                        vm.type_name(k)
                    ),
                ));
            }
            _ => skipped.push(format!("<{}>", vm.type_name(k))),
        }
    }
    if entries.is_empty() {
        skipped.truncate(10);
        return Err(Error::format(
            &file,
            format!(
                "{pkl_name} contains no tensors at the top level or under `state_dict` (keys: {})",
                if skipped.is_empty() {
                    "none".to_string()
                } else {
                    skipped.join(", ")
                }
            ),
        ));
    }
    if !skipped.is_empty() {
        tracing::debug!(file = %file, skipped = ?skipped, "skipping non-tensor entries of a .bin state dict");
    }

    let mut storage_data: HashMap<usize, (u64, u64)> = HashMap::new();
    let mut out = BTreeMap::new();
    for (name, v) in entries {
        let Value::Tensor(tid) = v else { continue };
        let t = &vm.tensors[tid];
        let st = &vm.storages[t.storage];
        let bad = |msg: String| Error::format(&file, format!("tensor {name}: {msg}"));
        let esize = st.dtype.size() as u64;

        let mut numel: u64 = 1;
        for &d in &t.shape {
            numel = numel
                .checked_mul(d)
                .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
        }
        if numel > 0 {
            // Contiguous (row-major) strides; dimensions of size 1 may carry
            // any stride.
            let mut want: u64 = 1;
            for (i, (&d, &s)) in t.shape.iter().zip(&t.stride).enumerate().rev() {
                if d != 1 && s != want {
                    return Err(bad(format!(
                        "non-contiguous tensor (shape {:?}, stride {:?}; dimension {i} has stride {s}, contiguous needs {want}) is not supported; save it with .contiguous() or convert the checkpoint to safetensors",
                        t.shape, t.stride
                    )));
                }
                want = want.saturating_mul(d);
            }
        }
        let nbytes = numel
            .checked_mul(esize)
            .ok_or_else(|| bad(format!("shape {:?} overflows", t.shape)))?;
        let start = t
            .offset
            .checked_mul(esize)
            .ok_or_else(|| bad(format!("storage offset {} overflows", t.offset)))?;
        let end = start
            .checked_add(nbytes)
            .ok_or_else(|| bad(format!("storage offset {} overflows", t.offset)))?;
        let storage_bytes = st.numel.saturating_mul(esize);
        if numel > 0 && end > storage_bytes {
            return Err(bad(format!(
                "elements {}..{} are past the end of storage {} ({} elements of {})",
                t.offset,
                t.offset.saturating_add(numel),
                st.key,
                st.numel,
                st.dtype.config_name()
            )));
        }

        let (data_start, entry_size) = match storage_data.get(&t.storage) {
            Some(&x) => x,
            None => {
                let ename = format!("{prefix}data/{}", st.key);
                let e = zip.entries.get(&ename).ok_or_else(|| {
                    bad(format!(
                        "its storage {} has no entry {ename} in the archive",
                        st.key
                    ))
                })?;
                if e.method != 0 {
                    return Err(bad(format!(
                        "storage entry {ename} is compressed (zip method {}); only uncompressed (stored) entries are supported, as torch.save writes them",
                        e.method
                    )));
                }
                let ds = zip.data_start(src, &ename, e)?;
                storage_data.insert(t.storage, (ds, e.size));
                (ds, e.size)
            }
        };
        if numel > 0 && end > entry_size {
            return Err(bad(format!(
                "bytes {start}..{end} are past the end of storage entry {prefix}data/{} ({entry_size} bytes)",
                st.key
            )));
        }
        out.insert(
            name,
            TensorLoc {
                shard: shard_idx,
                dtype: st.dtype,
                shape: t.shape.iter().map(|&d| d as usize).collect(),
                offset: if numel > 0 {
                    data_start + start
                } else {
                    data_start
                },
                nbytes,
            },
        );
    }
    Ok(out)
}

// ---------------------------------------------------------------------------
// Zip archive (central directory only; entries must be stored).

#[derive(Debug, Clone)]
struct ZipEntry {
    method: u16,
    flags: u16,
    size: u64,
    comp_size: u64,
    header_offset: u64,
}

struct Zip<'f> {
    file: &'f str,
    len: u64,
    entries: BTreeMap<String, ZipEntry>,
}

/// Little-endian reads over a byte slice; `None` when out of bytes.
struct Rd<'a> {
    b: &'a [u8],
    p: usize,
}

impl<'a> Rd<'a> {
    fn new(b: &'a [u8]) -> Self {
        Rd { b, p: 0 }
    }
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let end = self.p.checked_add(n)?;
        let s = self.b.get(self.p..end)?;
        self.p = end;
        Some(s)
    }
    fn u16(&mut self) -> Option<u16> {
        Some(u16::from_le_bytes(self.take(2)?.try_into().ok()?))
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
}

impl<'f> Zip<'f> {
    fn open(src: &dyn ByteSource, file: &'f str) -> Result<Zip<'f>> {
        let len = src.len();
        let err = |msg: String| Error::format(file, msg);
        if len >= 1 {
            let mut b = [0u8; 1];
            src.read_at(0, &mut b)?;
            if b[0] == 0x80 {
                return Err(err(
                    "legacy torch.save format (PyTorch < 1.6 or _use_new_zipfile_serialization=False) is not supported; re-save it with a recent PyTorch or convert it to safetensors".into(),
                ));
            }
        }
        if len < 22 {
            return Err(err(format!(
                "not a PyTorch zip checkpoint: only {len} bytes"
            )));
        }
        // End of central directory: 22 bytes plus a comment of up to 64 KiB.
        let tail_len = len.min(22 + 0xFFFF);
        let tail_start = len - tail_len;
        let mut tail = vec![0u8; tail_len as usize];
        src.read_at(tail_start, &mut tail)?;
        let eocd = (0..=tail.len() - 22)
            .rev()
            .find(|&i| {
                tail[i..i + 4] == [0x50, 0x4b, 0x05, 0x06]
                    && i + 22 + u16::from_le_bytes([tail[i + 20], tail[i + 21]]) as usize
                        <= tail.len()
            })
            .ok_or_else(|| {
                err("not a zip archive (no end-of-central-directory record): not a PyTorch checkpoint, or a truncated file".into())
            })?;
        let eocd_abs = tail_start + eocd as u64;
        let mut r = Rd::new(&tail[eocd + 4..eocd + 22]);
        let disk = r.u16().unwrap_or(0);
        let cd_disk = r.u16().unwrap_or(0);
        let _n_here = r.u16().unwrap_or(0);
        let mut count = r.u16().unwrap_or(0) as u64;
        let mut cd_size = r.u32().unwrap_or(0) as u64;
        let mut cd_off = r.u32().unwrap_or(0) as u64;
        if disk != 0 || cd_disk != 0 {
            return Err(err("multi-disk zip archives are not supported".into()));
        }

        // Zip64: a locator sits just before the EOCD record.
        if eocd_abs >= 20 {
            let mut loc = [0u8; 20];
            src.read_at(eocd_abs - 20, &mut loc)?;
            if loc[..4] == [0x50, 0x4b, 0x06, 0x07] {
                let rec_off = u64::from_le_bytes(loc[8..16].try_into().unwrap_or_default());
                if rec_off.saturating_add(56) > eocd_abs - 20 {
                    return Err(err(format!(
                        "zip64 end-of-central-directory offset {rec_off} is out of range: corrupt or truncated file"
                    )));
                }
                let mut rec = [0u8; 56];
                src.read_at(rec_off, &mut rec)?;
                if rec[..4] != [0x50, 0x4b, 0x06, 0x06] {
                    return Err(err(format!(
                        "no zip64 end-of-central-directory record at offset {rec_off}: corrupt file"
                    )));
                }
                let mut r = Rd::new(&rec[24..56]);
                let _n_here = r.u64();
                count = r.u64().unwrap_or(0);
                cd_size = r.u64().unwrap_or(0);
                cd_off = r.u64().unwrap_or(0);
            }
        }
        if cd_off.checked_add(cd_size).is_none_or(|e| e > eocd_abs) {
            return Err(err(format!(
                "zip central directory ({cd_size} bytes at offset {cd_off}) runs past its end record at {eocd_abs}: truncated or corrupt file"
            )));
        }
        if cd_size > MAX_CENTRAL_DIR {
            return Err(err(format!(
                "zip central directory of {cd_size} bytes is implausibly large"
            )));
        }
        let mut cd = vec![0u8; cd_size as usize];
        src.read_at(cd_off, &mut cd)?;

        let mut entries = BTreeMap::new();
        let mut r = Rd::new(&cd);
        let trunc = || err("zip central directory is truncated or corrupt".into());
        for _ in 0..count {
            if r.u32().ok_or_else(trunc)? != 0x0201_4b50 {
                return Err(err(
                    "bad zip central directory entry signature: corrupt file".into(),
                ));
            }
            let h = r.take(26).ok_or_else(trunc)?;
            let mut hr = Rd::new(h);
            let _made_by = hr.u16();
            let _needed = hr.u16();
            let flags = hr.u16().unwrap_or(0);
            let method = hr.u16().unwrap_or(0);
            let _time = hr.u32();
            let _crc = hr.u32();
            let mut comp_size = hr.u32().unwrap_or(0) as u64;
            let mut size = hr.u32().unwrap_or(0) as u64;
            let name_len = hr.u16().unwrap_or(0) as usize;
            let extra_len = r.u16().ok_or_else(trunc)? as usize;
            let comment_len = r.u16().ok_or_else(trunc)? as usize;
            let _disk = r.u16().ok_or_else(trunc)?;
            let _int_attr = r.u16().ok_or_else(trunc)?;
            let _ext_attr = r.u32().ok_or_else(trunc)?;
            let mut header_offset = r.u32().ok_or_else(trunc)? as u64;
            let name = r.take(name_len).ok_or_else(trunc)?;
            let extra = r.take(extra_len).ok_or_else(trunc)?;
            r.take(comment_len).ok_or_else(trunc)?;
            // Zip64 extended information: only the fields saturated above.
            let mut er = Rd::new(extra);
            while let (Some(id), Some(n)) = (er.u16(), er.u16()) {
                let Some(body) = er.take(n as usize) else {
                    break;
                };
                if id != 0x0001 {
                    continue;
                }
                let mut br = Rd::new(body);
                if size == 0xFFFF_FFFF {
                    size = br.u64().ok_or_else(trunc)?;
                }
                if comp_size == 0xFFFF_FFFF {
                    comp_size = br.u64().ok_or_else(trunc)?;
                }
                if header_offset == 0xFFFF_FFFF {
                    header_offset = br.u64().ok_or_else(trunc)?;
                }
            }
            entries.insert(
                String::from_utf8_lossy(name).into_owned(),
                ZipEntry {
                    method,
                    flags,
                    size,
                    comp_size,
                    header_offset,
                },
            );
        }
        Ok(Zip { file, len, entries })
    }

    /// The `<archive>/data.pkl` entry (the archive folder is `archive` in
    /// recent PyTorch, the file's stem in older ones).
    fn find_data_pkl(&self) -> Result<String> {
        let mut found = self
            .entries
            .keys()
            .filter(|n| n.ends_with("/data.pkl") && n.matches('/').count() == 1)
            .chain(self.entries.keys().filter(|n| *n == "data.pkl"));
        match (found.next(), found.next()) {
            (Some(n), None) => Ok(n.clone()),
            (Some(a), Some(b)) => Err(Error::format(
                self.file,
                format!(
                    "archive holds more than one pickle ({a}, {b}); not a single torch.save checkpoint"
                ),
            )),
            (None, _) => Err(Error::format(
                self.file,
                "zip archive has no <archive>/data.pkl: not a PyTorch checkpoint",
            )),
        }
    }

    /// Absolute offset of an entry's data (after its local header, whose
    /// extra field may differ from the central one: torch pads it to align
    /// the data).
    fn data_start(&self, src: &dyn ByteSource, name: &str, e: &ZipEntry) -> Result<u64> {
        let bad = |msg: String| Error::format(self.file, format!("zip entry {name}: {msg}"));
        if e.flags & 1 != 0 {
            return Err(bad("is encrypted".into()));
        }
        if e.header_offset.saturating_add(30) > self.len {
            return Err(bad(format!(
                "local header offset {} is past the end of the file: truncated file?",
                e.header_offset
            )));
        }
        let mut h = [0u8; 30];
        src.read_at(e.header_offset, &mut h)?;
        if h[..4] != [0x50, 0x4b, 0x03, 0x04] {
            return Err(bad(format!(
                "no local header at offset {}: corrupt file",
                e.header_offset
            )));
        }
        let n = u16::from_le_bytes([h[26], h[27]]) as u64;
        let x = u16::from_le_bytes([h[28], h[29]]) as u64;
        let start = e.header_offset + 30 + n + x;
        let stored = if e.method == 0 { e.size } else { e.comp_size };
        if start.saturating_add(stored) > self.len {
            return Err(bad(format!(
                "data ({stored} bytes at offset {start}) runs past the end of the file ({} bytes): truncated file?",
                self.len
            )));
        }
        Ok(start)
    }

    fn read_entry(
        &self,
        src: &dyn ByteSource,
        name: &str,
        e: &ZipEntry,
        max: u64,
    ) -> Result<Vec<u8>> {
        if e.method != 0 {
            return Err(Error::format(
                self.file,
                format!(
                    "zip entry {name} is compressed (method {}); torch.save writes uncompressed entries, so this archive was re-packed: unzip and re-zip it with `zip -0`, or convert it to safetensors",
                    e.method
                ),
            ));
        }
        if e.size > max {
            return Err(Error::format(
                self.file,
                format!("zip entry {name} is implausibly large ({} bytes)", e.size),
            ));
        }
        let start = self.data_start(src, name, e)?;
        let mut buf = vec![0u8; e.size as usize];
        src.read_at(start, &mut buf)?;
        Ok(buf)
    }
}

// ---------------------------------------------------------------------------
// Restricted unpickler.

/// The globals the unpickler knows; it implements each one itself.
#[derive(Debug, Clone, Copy, PartialEq)]
enum Global {
    RebuildTensor,
    RebuildTensorV2,
    RebuildParameter,
    RebuildParameterWithState,
    RebuildFromTypeV2,
    OrderedDict,
    Storage(DType),
    TensorType,
    ParameterType,
    CodecsEncode,
}

impl Global {
    fn lookup(module: &str, name: &str) -> Option<Global> {
        Some(match (module, name) {
            ("torch._utils", "_rebuild_tensor") => Global::RebuildTensor,
            ("torch._utils", "_rebuild_tensor_v2") => Global::RebuildTensorV2,
            ("torch._utils", "_rebuild_parameter") => Global::RebuildParameter,
            ("torch._utils", "_rebuild_parameter_with_state") => Global::RebuildParameterWithState,
            ("torch._tensor", "_rebuild_from_type_v2") => Global::RebuildFromTypeV2,
            ("collections", "OrderedDict") => Global::OrderedDict,
            ("torch", "Tensor") => Global::TensorType,
            ("torch.nn.parameter", "Parameter") => Global::ParameterType,
            ("_codecs", "encode") => Global::CodecsEncode,
            ("torch", s) => Global::Storage(match s {
                "FloatStorage" => DType::F32,
                "DoubleStorage" => DType::F64,
                "HalfStorage" => DType::F16,
                "BFloat16Storage" => DType::BF16,
                "LongStorage" => DType::I64,
                "IntStorage" => DType::I32,
                "ShortStorage" => DType::I16,
                "CharStorage" => DType::I8,
                "ByteStorage" => DType::U8,
                "BoolStorage" => DType::Bool,
                _ => return None,
            }),
            _ => return None,
        })
    }
}

/// A pickle value. Containers live in arenas and are referred to by index,
/// so values are cheap to copy (memo gets) and dropping them never recurses.
/// Scalars smelt never looks at (bools, floats, bytes) carry no payload.
#[derive(Debug, Clone)]
enum Value {
    None,
    Bool,
    Int(i64),
    /// An integer too large for i64 (kept only so it can be skipped).
    BigInt,
    Float,
    Str(Rc<str>),
    Bytes,
    Tuple(usize),
    List(usize),
    Dict(usize),
    Global(Global),
    Storage(usize),
    Tensor(usize),
}

#[derive(Debug)]
struct StorageRef {
    key: String,
    dtype: DType,
    numel: u64,
}

#[derive(Debug)]
struct TensorRef {
    storage: usize,
    offset: u64,
    shape: Vec<u64>,
    stride: Vec<u64>,
}

struct Unpickler<'a> {
    data: &'a [u8],
    pos: usize,
    file: &'a str,
    entry: &'a str,
    stack: Vec<Value>,
    marks: Vec<usize>,
    memo: HashMap<u32, Value>,
    tuples: Vec<Vec<Value>>,
    lists: Vec<Vec<Value>>,
    dicts: Vec<Vec<(Value, Value)>>,
    storages: Vec<StorageRef>,
    /// Storage index by key: one storage per key, however often it is named.
    storage_keys: HashMap<String, usize>,
    tensors: Vec<TensorRef>,
}

impl<'a> Unpickler<'a> {
    fn new(data: &'a [u8], file: &'a str, entry: &'a str) -> Self {
        Unpickler {
            data,
            pos: 0,
            file,
            entry,
            stack: Vec::new(),
            marks: Vec::new(),
            memo: HashMap::new(),
            tuples: Vec::new(),
            lists: Vec::new(),
            dicts: Vec::new(),
            storages: Vec::new(),
            storage_keys: HashMap::new(),
            tensors: Vec::new(),
        }
    }

    fn err(&self, msg: impl std::fmt::Display) -> Error {
        Error::format(
            self.file,
            format!("{} (byte {}): {msg}", self.entry, self.pos),
        )
    }

    fn take(&mut self, n: usize) -> Result<&'a [u8]> {
        let data: &'a [u8] = self.data;
        match self
            .pos
            .checked_add(n)
            .and_then(|end| data.get(self.pos..end))
        {
            Some(s) => {
                self.pos += n;
                Ok(s)
            }
            None => Err(self.err("pickle ends early: truncated or corrupt")),
        }
    }
    fn arr<const N: usize>(&mut self) -> Result<[u8; N]> {
        let s = self.take(N)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }
    fn len_u(&mut self, n: u64) -> Result<usize> {
        usize::try_from(n)
            .ok()
            .filter(|&n| n <= self.data.len())
            .ok_or_else(|| self.err(format!("length {n} is past the end of the pickle")))
    }
    fn line(&mut self) -> Result<&'a str> {
        let data: &'a [u8] = self.data;
        let rest = &data[self.pos.min(data.len())..];
        let n = rest
            .iter()
            .position(|&b| b == b'\n')
            .ok_or_else(|| self.err("unterminated GLOBAL operand"))?;
        self.pos += n + 1;
        std::str::from_utf8(&rest[..n]).map_err(|_| self.err("GLOBAL operand is not UTF-8"))
    }

    fn pop(&mut self) -> Result<Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow: corrupt pickle"));
        }
        self.stack.pop().ok_or_else(|| self.err("stack underflow"))
    }
    fn top(&mut self) -> Result<&mut Value> {
        let floor = self.marks.last().copied().unwrap_or(0);
        if self.stack.len() <= floor {
            return Err(self.err("stack underflow: corrupt pickle"));
        }
        self.stack
            .last_mut()
            .ok_or_else(|| Error::msg("stack underflow"))
    }
    fn pop_mark(&mut self) -> Result<Vec<Value>> {
        let m = self
            .marks
            .pop()
            .ok_or_else(|| self.err("no MARK on the stack: corrupt pickle"))?;
        Ok(self.stack.split_off(m.min(self.stack.len())))
    }
    fn push_tuple(&mut self, items: Vec<Value>) {
        self.tuples.push(items);
        self.stack.push(Value::Tuple(self.tuples.len() - 1));
    }
    fn str_val(&self, b: &[u8]) -> Result<Value> {
        let s = std::str::from_utf8(b).map_err(|_| self.err("string is not valid UTF-8"))?;
        Ok(Value::Str(Rc::from(s)))
    }

    fn type_name(&self, v: &Value) -> &'static str {
        match v {
            Value::None => "None",
            Value::Bool => "bool",
            Value::Int(_) | Value::BigInt => "int",
            Value::Float => "float",
            Value::Str(_) => "str",
            Value::Bytes => "bytes",
            Value::Tuple(_) => "tuple",
            Value::List(_) => "list",
            Value::Dict(_) => "dict",
            Value::Global(_) => "class or function",
            Value::Storage(_) => "storage",
            Value::Tensor(_) => "tensor",
        }
    }

    fn dict_get(&self, id: usize, key: &str) -> Option<Value> {
        self.dicts[id]
            .iter()
            .rev()
            .find(|(k, _)| matches!(k, Value::Str(s) if &**s == key))
            .map(|(_, v)| v.clone())
    }

    fn dict_set(&mut self, target: &Value, items: Vec<(Value, Value)>) -> Result<()> {
        match *target {
            Value::Dict(id) => {
                self.dicts[id].extend(items);
                Ok(())
            }
            ref v => Err(self.err(format!("SETITEM on a {}", self.type_name(v)))),
        }
    }

    fn list_extend(&mut self, target: &Value, items: Vec<Value>) -> Result<()> {
        match *target {
            Value::List(id) => {
                self.lists[id].extend(items);
                Ok(())
            }
            ref v => Err(self.err(format!("APPEND on a {}", self.type_name(v)))),
        }
    }

    /// Runs the pickle to its STOP opcode and returns the result.
    fn run(&mut self) -> Result<Value> {
        loop {
            let op = self.take(1)?[0];
            match op {
                0x80 => {
                    let p = self.take(1)?[0];
                    if p > 5 {
                        return Err(self.err(format!("unsupported pickle protocol {p}")));
                    }
                }
                0x95 => {
                    self.take(8)?; // FRAME: framing is transparent here
                }
                b'.' => {
                    let v = self.pop()?;
                    return Ok(v);
                }
                b'(' => self.marks.push(self.stack.len()),
                b'0' => {
                    self.pop()?;
                }
                b'1' => {
                    self.pop_mark()?;
                }
                b'2' => {
                    let v = self.top()?.clone();
                    self.stack.push(v);
                }
                b'N' => self.stack.push(Value::None),
                0x88 => self.stack.push(Value::Bool),
                0x89 => self.stack.push(Value::Bool),
                b'J' => {
                    let v = i32::from_le_bytes(self.arr()?);
                    self.stack.push(Value::Int(v as i64));
                }
                b'K' => {
                    let v = self.take(1)?[0];
                    self.stack.push(Value::Int(v as i64));
                }
                b'M' => {
                    let v = u16::from_le_bytes(self.arr()?);
                    self.stack.push(Value::Int(v as i64));
                }
                0x8a | 0x8b => {
                    let n = if op == 0x8a {
                        self.take(1)?[0] as u64
                    } else {
                        let n = i32::from_le_bytes(self.arr()?);
                        if n < 0 {
                            return Err(self.err("LONG4 with a negative length"));
                        }
                        n as u64
                    };
                    let n = self.len_u(n)?;
                    let b = self.take(n)?;
                    self.stack.push(decode_long(b));
                }
                b'G' => {
                    self.take(8)?;
                    self.stack.push(Value::Float);
                }
                b'X' | 0x8c | 0x8d | b'T' | b'U' => {
                    let n = match op {
                        b'X' | b'T' => u32::from_le_bytes(self.arr()?) as u64,
                        0x8d => u64::from_le_bytes(self.arr()?),
                        _ => self.take(1)?[0] as u64,
                    };
                    let n = self.len_u(n)?;
                    let b = self.take(n)?;
                    let v = if matches!(op, b'T' | b'U') {
                        // Python 2 str: loaded as text by default.
                        Value::Str(Rc::from(String::from_utf8_lossy(b).as_ref()))
                    } else {
                        self.str_val(b)?
                    };
                    self.stack.push(v);
                }
                b'B' | b'C' | 0x8e => {
                    let n = match op {
                        b'B' => u32::from_le_bytes(self.arr()?) as u64,
                        0x8e => u64::from_le_bytes(self.arr()?),
                        _ => self.take(1)?[0] as u64,
                    };
                    let n = self.len_u(n)?;
                    self.take(n)?;
                    self.stack.push(Value::Bytes);
                }
                b')' => self.push_tuple(Vec::new()),
                b't' => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items);
                }
                0x85..=0x87 => {
                    let n = (op - 0x84) as usize;
                    let floor = self.marks.last().copied().unwrap_or(0);
                    if self.stack.len() < floor + n {
                        return Err(self.err("stack underflow: corrupt pickle"));
                    }
                    let items = self.stack.split_off(self.stack.len() - n);
                    self.push_tuple(items);
                }
                b']' | 0x8f => {
                    // Sets are kept as lists: only their presence matters.
                    self.lists.push(Vec::new());
                    self.stack.push(Value::List(self.lists.len() - 1));
                }
                b'l' => {
                    let items = self.pop_mark()?;
                    self.lists.push(items);
                    self.stack.push(Value::List(self.lists.len() - 1));
                }
                0x91 => {
                    let items = self.pop_mark()?;
                    self.push_tuple(items);
                }
                b'a' => {
                    let v = self.pop()?;
                    let t = self.top()?.clone();
                    self.list_extend(&t, vec![v])?;
                }
                b'e' | 0x90 => {
                    let items = self.pop_mark()?;
                    let t = self.top()?.clone();
                    self.list_extend(&t, items)?;
                }
                b'}' => {
                    self.dicts.push(Vec::new());
                    self.stack.push(Value::Dict(self.dicts.len() - 1));
                }
                b'd' => {
                    let items = self.pop_mark()?;
                    let pairs =
                        pairs(items).ok_or_else(|| self.err("DICT with an odd number of items"))?;
                    self.dicts.push(pairs);
                    self.stack.push(Value::Dict(self.dicts.len() - 1));
                }
                b's' => {
                    let v = self.pop()?;
                    let k = self.pop()?;
                    let t = self.top()?.clone();
                    self.dict_set(&t, vec![(k, v)])?;
                }
                b'u' => {
                    let items = self.pop_mark()?;
                    let pairs = pairs(items)
                        .ok_or_else(|| self.err("SETITEMS with an odd number of items"))?;
                    let t = self.top()?.clone();
                    self.dict_set(&t, pairs)?;
                }
                b'c' => {
                    let module = self.line()?;
                    let name = self.line()?;
                    let g = self.global(module, name)?;
                    self.stack.push(g);
                }
                0x93 => {
                    let name = self.pop()?;
                    let module = self.pop()?;
                    let (Value::Str(module), Value::Str(name)) = (module, name) else {
                        return Err(self.err("STACK_GLOBAL operands are not strings"));
                    };
                    let g = self.global(&module, &name)?;
                    self.stack.push(g);
                }
                b'R' | 0x81 => {
                    let args = self.pop()?;
                    let f = self.pop()?;
                    let Value::Tuple(args) = args else {
                        return Err(self.err("REDUCE arguments are not a tuple"));
                    };
                    if self.tuples[args].len() > MAX_ARGS {
                        return Err(self.err(format!(
                            "REDUCE with {} arguments: not a state dict",
                            self.tuples[args].len()
                        )));
                    }
                    let args = self.tuples[args].clone();
                    let v = self.call(&f, &args, 0)?;
                    self.stack.push(v);
                }
                b'b' => {
                    // BUILD sets an object's state (e.g. a state dict's
                    // `_metadata`): nothing smelt needs, and nothing to run.
                    self.pop()?;
                    self.top()?;
                }
                b'Q' => {
                    let pid = self.pop()?;
                    let v = self.persistent_load(&pid)?;
                    self.stack.push(v);
                }
                b'q' | b'r' | 0x94 => {
                    let idx = match op {
                        b'q' => self.take(1)?[0] as u32,
                        b'r' => u32::from_le_bytes(self.arr()?),
                        _ => {
                            u32::try_from(self.memo.len()).map_err(|_| self.err("memo is full"))?
                        }
                    };
                    let v = self.top()?.clone();
                    self.memo.insert(idx, v);
                }
                b'h' | b'j' => {
                    let idx = if op == b'h' {
                        self.take(1)?[0] as u32
                    } else {
                        u32::from_le_bytes(self.arr()?)
                    };
                    let v = self
                        .memo
                        .get(&idx)
                        .cloned()
                        .ok_or_else(|| self.err(format!("memo index {idx} is not set")))?;
                    self.stack.push(v);
                }
                other => {
                    self.pos -= 1;
                    return Err(self.err(format!(
                        "unsupported pickle opcode 0x{other:02x} ({}); smelt reads only PyTorch state dicts and never runs pickle code",
                        opcode_name(other)
                    )));
                }
            }
        }
    }

    fn global(&self, module: &str, name: &str) -> Result<Value> {
        Global::lookup(module, name).map(Value::Global).ok_or_else(|| {
            self.err(format!(
                "refers to global `{module}.{name}`, which smelt does not load: only PyTorch state dicts (tensors, OrderedDict) are supported, and no pickle code is ever executed"
            ))
        })
    }

    fn persistent_load(&mut self, pid: &Value) -> Result<Value> {
        let items = match pid {
            Value::Tuple(t) if self.tuples[*t].len() == 5 => self.tuples[*t].clone(),
            v => {
                return Err(self.err(format!(
                    "persistent id is a {}, not a tuple",
                    self.type_name(v)
                )));
            }
        };
        let [Value::Str(kind), ty, Value::Str(key), _location, numel] = &items[..] else {
            return Err(
                self.err("persistent id is not ('storage', storage_type, key, location, numel)")
            );
        };
        if &**kind != "storage" {
            return Err(self.err(format!("unsupported persistent id kind {kind:?}")));
        }
        let Value::Global(Global::Storage(dtype)) = ty else {
            return Err(self.err(format!(
                "storage {key} has an unsupported storage type ({})",
                self.type_name(ty)
            )));
        };
        let Value::Int(numel) = *numel else {
            return Err(self.err(format!("storage {key} has a non-integer size")));
        };
        let numel = u64::try_from(numel)
            .map_err(|_| self.err(format!("storage {key} has size {numel}")))?;
        if key.is_empty() || key.contains('/') || key.contains("..") {
            return Err(self.err(format!("storage key {key:?} is not a plain name")));
        }
        if let Some(&i) = self.storage_keys.get(&**key) {
            let s = &self.storages[i];
            if s.dtype != *dtype || s.numel != numel {
                return Err(self.err(format!(
                    "storage {key} is named twice with different types or sizes"
                )));
            }
            return Ok(Value::Storage(i));
        }
        self.storages.push(StorageRef {
            key: key.to_string(),
            dtype: *dtype,
            numel,
        });
        self.storage_keys
            .insert(key.to_string(), self.storages.len() - 1);
        Ok(Value::Storage(self.storages.len() - 1))
    }

    fn dims(&self, v: &Value, what: &str) -> Result<Vec<u64>> {
        let Value::Tuple(t) = v else {
            return Err(self.err(format!(
                "tensor {what} is a {}, not a tuple",
                self.type_name(v)
            )));
        };
        if self.tuples[*t].len() > MAX_DIMS {
            return Err(self.err(format!(
                "tensor {what} has {} dimensions (at most {MAX_DIMS})",
                self.tuples[*t].len()
            )));
        }
        self.tuples[*t]
            .iter()
            .map(|d| match d {
                Value::Int(i) if *i >= 0 => Ok(*i as u64),
                _ => Err(self.err(format!("tensor {what} holds a non-negative-integer entry"))),
            })
            .collect()
    }

    /// Applies one of the known globals to `args`.
    fn call(&mut self, f: &Value, args: &[Value], depth: u32) -> Result<Value> {
        let Value::Global(g) = f else {
            return Err(self.err(format!("REDUCE on a {}, not a function", self.type_name(f))));
        };
        let bad_args = |s: &Self| s.err(format!("unexpected arguments to {g:?}"));
        match g {
            Global::OrderedDict => {
                if !args.is_empty() {
                    return Err(bad_args(self));
                }
                self.dicts.push(Vec::new());
                Ok(Value::Dict(self.dicts.len() - 1))
            }
            Global::RebuildTensor | Global::RebuildTensorV2 => {
                let ok_len = if *g == Global::RebuildTensor {
                    args.len() == 4
                } else {
                    (6..=7).contains(&args.len())
                };
                if !ok_len {
                    return Err(bad_args(self));
                }
                let Value::Storage(storage) = args[0] else {
                    return Err(self.err(format!(
                        "tensor built from a {}, not a storage",
                        self.type_name(&args[0])
                    )));
                };
                let Value::Int(offset) = args[1] else {
                    return Err(self.err("tensor storage offset is not an integer"));
                };
                let offset = u64::try_from(offset)
                    .map_err(|_| self.err(format!("negative storage offset {offset}")))?;
                let shape = self.dims(&args[2], "size")?;
                let stride = self.dims(&args[3], "stride")?;
                if shape.len() != stride.len() {
                    return Err(self.err(format!(
                        "tensor size {shape:?} and stride {stride:?} have different lengths"
                    )));
                }
                self.tensors.push(TensorRef {
                    storage,
                    offset,
                    shape,
                    stride,
                });
                Ok(Value::Tensor(self.tensors.len() - 1))
            }
            Global::RebuildParameter | Global::RebuildParameterWithState => {
                let n = if *g == Global::RebuildParameter { 3 } else { 4 };
                match args.first() {
                    Some(t @ Value::Tensor(_)) if args.len() == n => Ok(t.clone()),
                    _ => Err(bad_args(self)),
                }
            }
            Global::RebuildFromTypeV2 => {
                let [
                    func,
                    Value::Global(Global::TensorType | Global::ParameterType),
                    Value::Tuple(inner),
                    _state,
                ] = args
                else {
                    return Err(bad_args(self));
                };
                if depth > 0 {
                    return Err(bad_args(self));
                }
                if self.tuples[*inner].len() > MAX_ARGS {
                    return Err(bad_args(self));
                }
                let inner = self.tuples[*inner].clone();
                self.call(func, &inner, depth + 1)
            }
            Global::CodecsEncode => match args {
                [Value::Str(s), Value::Str(enc)] if matches!(&**enc, "latin1" | "latin-1") => {
                    if s.chars().all(|c| u32::from(c) < 256) {
                        Ok(Value::Bytes)
                    } else {
                        Err(self.err("_codecs.encode of a non-latin-1 string"))
                    }
                }
                _ => Err(bad_args(self)),
            },
            Global::Storage(_) | Global::TensorType | Global::ParameterType => Err(self.err(
                format!("calling {g:?} directly is not supported (not a state dict)"),
            )),
        }
    }
}

/// Pairs up `[k1, v1, k2, v2, ...]`.
fn pairs(items: Vec<Value>) -> Option<Vec<(Value, Value)>> {
    if !items.len().is_multiple_of(2) {
        return None;
    }
    let mut out = Vec::with_capacity(items.len() / 2);
    let mut it = items.into_iter();
    while let (Some(k), Some(v)) = (it.next(), it.next()) {
        out.push((k, v));
    }
    Some(out)
}

/// Decodes a little-endian two's-complement LONG1/LONG4 operand.
fn decode_long(b: &[u8]) -> Value {
    if b.is_empty() {
        return Value::Int(0);
    }
    if b.len() > 8 {
        return Value::BigInt;
    }
    let fill = if b[b.len() - 1] & 0x80 != 0 { 0xFF } else { 0 };
    let mut a = [fill; 8];
    a[..b.len()].copy_from_slice(b);
    Value::Int(i64::from_le_bytes(a))
}

fn opcode_name(op: u8) -> &'static str {
    match op {
        b'i' => "INST",
        b'o' => "OBJ",
        0x92 => "NEWOBJ_EX",
        b'P' => "PERSID",
        b'I' => "INT",
        b'L' => "LONG",
        b'F' => "FLOAT",
        b'S' => "STRING",
        b'V' => "UNICODE",
        b'p' => "PUT",
        b'g' => "GET",
        0x82..=0x84 => "EXT",
        0x96 => "BYTEARRAY8",
        0x97 => "NEXT_BUFFER",
        0x98 => "READONLY_BUFFER",
        _ => "unknown",
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use super::*;
    use crate::io::safetensors::ModelTensors;

    /// An in-memory file.
    #[derive(Debug)]
    struct Mem(Vec<u8>);

    impl ByteSource for Mem {
        fn len(&self) -> u64 {
            self.0.len() as u64
        }
        fn read_at(&self, offset: u64, buf: &mut [u8]) -> Result<()> {
            let start = usize::try_from(offset).map_err(|_| Error::msg("offset"))?;
            let src = start
                .checked_add(buf.len())
                .and_then(|end| self.0.get(start..end))
                .ok_or_else(|| Error::format("mem.bin", "read past the end"))?;
            buf.copy_from_slice(src);
            Ok(())
        }
        fn name(&self) -> String {
            "mem.bin".into()
        }
    }

    fn unhex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }

    // The three pickles below come from Python's own pickler, driven the way
    // torch.save drives it (persistent ids for storages, Tensor.__reduce_ex__
    // returning torch._utils._rebuild_tensor_v2, nn.Parameter returning
    // _rebuild_parameter, tensor subclasses wrapped in _rebuild_from_type_v2),
    // with stand-in `torch` modules:
    //
    //   s0 = ('storage', torch.BFloat16Storage, '0', 'cpu', 6)
    //   s1 = ('storage', torch.FloatStorage, '1', 'cpu', 8)
    //   SD_P2: OrderedDict(model.w = bf16 s0[0:6] as (2, 3),
    //                      model.b = f32 s1[2:6] as (4,),
    //                      model.head = f32 s1[0:2] as (2,)),
    //          with a `_metadata` attribute (BUILD), protocol 2
    //   TOP_P4 / TOP_P2: {'state_dict': OrderedDict(
    //                       p = Parameter(f32 s1[4:8] as (2, 2)),
    //                       t = _rebuild_from_type_v2(bf16 s0[3:6] as (3,))),
    //                     'epoch': 3, 'note': b'xy', 'lr': 0.5}
    //          at protocols 4 (FRAME, STACK_GLOBAL, MEMOIZE) and 2
    //          (`_codecs.encode` for the bytes value).
    const SD_P2: &str = "800263636f6c6c656374696f6e730a4f726465726564446963740a7100295271012858070000006d6f64656c2e77710263746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71032828580700000073746f72616765710463746f7263680a42466c6f6174313653746f726167650a71055801000000307106580300000063707571074b06747108514b004b024b038671094b034b0186710a8968002952710b74710c52710d58070000006d6f64656c2e62710e68032828680463746f7263680a466c6f617453746f726167650a710f580100000031711068074b08747111514b024b048571124b0185711389680029527114747115527116580a0000006d6f64656c2e686561647117680328286804680f681068074b08747118514b004b0285711968138968002952711a74711b52711c757d711d58090000005f6d65746164617461711e68002952711f28580000000071207d7121580700000076657273696f6e71224b017358050000006d6f64656c71237d712468224b01737573622e";
    const TOP_P4: &str = "8004956d010000000000007d94288c0a73746174655f64696374948c0b636f6c6c656374696f6e73948c0b4f72646572656444696374949394295294288c0170948c0c746f7263682e5f7574696c73948c125f72656275696c645f706172616d6574657294939468078c125f72656275696c645f74656e736f725f763294939428288c0773746f72616765948c05746f726368948c0c466c6f617453746f726167659493948c0131948c03637075944b087494514b044b024b0286944b024b01869489680429529474945294886804295294879452948c0174948c0d746f7263682e5f74656e736f72948c155f72656275696c645f66726f6d5f747970655f763294939428680b680d8c0654656e736f729493942828680c680d8c0f42466c6f6174313653746f726167659493948c01309468114b067494514b034b0385944b01859489680429529474947d9474945294758c0565706f6368944b038c046e6f74659443027879948c026c7294473fe0000000000000752e";
    const TOP_P2: &str = "80027d710028580a00000073746174655f64696374710163636f6c6c656374696f6e730a4f726465726564446963740a71022952710328580100000070710463746f7263682e5f7574696c730a5f72656275696c645f706172616d657465720a710563746f7263682e5f7574696c730a5f72656275696c645f74656e736f725f76320a71062828580700000073746f72616765710763746f7263680a466c6f617453746f726167650a710858010000003171095803000000637075710a4b0874710b514b044b024b0286710c4b024b0186710d8968022952710e74710f52711088680229527111877112527113580100000074711463746f7263682e5f74656e736f720a5f72656275696c645f66726f6d5f747970655f76320a711528680663746f7263680a54656e736f720a71162828680763746f7263680a42466c6f6174313653746f726167650a71175801000000307118680a4b06747119514b034b0385711a4b0185711b8968022952711c74711d7d711e74711f52712075580500000065706f636871214b0358040000006e6f74657122635f636f646563730a656e636f64650a712358020000007879712458060000006c6174696e31712586712652712758020000006c727128473fe0000000000000752e";

    /// Storage contents: s0 = bf16 of 1..=6, s1 = f32 of 10..=17.
    fn storages() -> Vec<(&'static str, Vec<u8>)> {
        let s0: Vec<u8> = (1..=6)
            .flat_map(|i| half::bf16::from_f32(i as f32).to_le_bytes())
            .collect();
        let s1: Vec<u8> = (10..18).flat_map(|i| (i as f32).to_le_bytes()).collect();
        vec![("0", s0), ("1", s1)]
    }

    struct Entry<'a> {
        name: String,
        data: &'a [u8],
        method: u16,
    }

    /// Writes a zip the way PyTorch's writer does: stored entries whose data
    /// is aligned to 64 bytes with an `FB` padding extra field in the local
    /// header only. `zip64` forces zip64 central records and end records.
    fn zip(entries: &[Entry], zip64: bool) -> Vec<u8> {
        let mut out = Vec::new();
        let mut central = Vec::new();
        for e in entries {
            let off = out.len() as u64;
            let name = e.name.as_bytes();
            let base = off as usize + 30 + name.len() + 4;
            let pad = (64 - base % 64) % 64;
            out.extend_from_slice(&0x0403_4b50u32.to_le_bytes());
            out.extend_from_slice(&20u16.to_le_bytes());
            out.extend_from_slice(&0u16.to_le_bytes());
            out.extend_from_slice(&e.method.to_le_bytes());
            out.extend_from_slice(&[0; 8]); // time, date, crc
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(e.data.len() as u32).to_le_bytes());
            out.extend_from_slice(&(name.len() as u16).to_le_bytes());
            out.extend_from_slice(&((4 + pad) as u16).to_le_bytes());
            out.extend_from_slice(name);
            out.extend_from_slice(b"FB");
            out.extend_from_slice(&(pad as u16).to_le_bytes());
            out.extend(std::iter::repeat_n(b'Z', pad));
            assert_eq!(out.len() % 64, 0);
            out.extend_from_slice(e.data);

            let big = if zip64 { 0xFFFF_FFFFu32 } else { 0 };
            let extra: Vec<u8> = if zip64 {
                let mut x = vec![1, 0, 24, 0];
                x.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
                x.extend_from_slice(&(e.data.len() as u64).to_le_bytes());
                x.extend_from_slice(&off.to_le_bytes());
                x
            } else {
                Vec::new()
            };
            central.extend_from_slice(&0x0201_4b50u32.to_le_bytes());
            central.extend_from_slice(&[45, 0, 45, 0, 0, 0]);
            central.extend_from_slice(&e.method.to_le_bytes());
            central.extend_from_slice(&[0; 8]);
            let size = if zip64 { big } else { e.data.len() as u32 };
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&size.to_le_bytes());
            central.extend_from_slice(&(name.len() as u16).to_le_bytes());
            central.extend_from_slice(&(extra.len() as u16).to_le_bytes());
            central.extend_from_slice(&[0; 10]); // comment len, disk, attrs
            let off32 = if zip64 { big } else { off as u32 };
            central.extend_from_slice(&off32.to_le_bytes());
            central.extend_from_slice(name);
            central.extend_from_slice(&extra);
        }
        let cd_off = out.len() as u64;
        out.extend_from_slice(&central);
        let n = entries.len() as u64;
        if zip64 {
            let rec = out.len() as u64;
            out.extend_from_slice(&0x0606_4b50u32.to_le_bytes());
            out.extend_from_slice(&44u64.to_le_bytes());
            out.extend_from_slice(&[45, 0, 45, 0]);
            out.extend_from_slice(&[0; 8]);
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&n.to_le_bytes());
            out.extend_from_slice(&(central.len() as u64).to_le_bytes());
            out.extend_from_slice(&cd_off.to_le_bytes());
            out.extend_from_slice(&0x0706_4b50u32.to_le_bytes());
            out.extend_from_slice(&0u32.to_le_bytes());
            out.extend_from_slice(&rec.to_le_bytes());
            out.extend_from_slice(&1u32.to_le_bytes());
        }
        out.extend_from_slice(&0x0605_4b50u32.to_le_bytes());
        out.extend_from_slice(&[0; 4]);
        let (n16, cs, co) = if zip64 {
            (0xFFFF, 0xFFFF_FFFF, 0xFFFF_FFFF)
        } else {
            (n as u16, central.len() as u32, cd_off as u32)
        };
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&n16.to_le_bytes());
        out.extend_from_slice(&cs.to_le_bytes());
        out.extend_from_slice(&co.to_le_bytes());
        out.extend_from_slice(&0u16.to_le_bytes());
        out
    }

    /// A torch checkpoint: `archive/data.pkl`, `archive/data/<key>`...
    fn checkpoint(pkl: &[u8], storages: &[(&str, Vec<u8>)], zip64: bool) -> Vec<u8> {
        let mut entries = vec![Entry {
            name: "archive/data.pkl".into(),
            data: pkl,
            method: 0,
        }];
        entries.push(Entry {
            name: "archive/byteorder".into(),
            data: b"little",
            method: 0,
        });
        for (k, d) in storages {
            entries.push(Entry {
                name: format!("archive/data/{k}"),
                data: d,
                method: 0,
            });
        }
        entries.push(Entry {
            name: "archive/version".into(),
            data: b"3\n",
            method: 0,
        });
        zip(&entries, zip64)
    }

    fn model(file: Vec<u8>) -> ModelTensors {
        let src = Mem(file);
        let tensors = read_bin_index(&src, 0).unwrap();
        ModelTensors {
            label: "m".into(),
            shards: vec![Arc::new(src)],
            tensors,
            lora: None,
        }
    }

    #[test]
    fn pickle_model_directories_open_like_safetensors_ones() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(
            dir.path().join("pytorch_model.bin"),
            checkpoint(&unhex(SD_P2), &storages(), false),
        )
        .unwrap();
        let m = ModelTensors::open_dir(dir.path(), "bin-model").unwrap();
        assert_eq!(
            values(&m, "model.head"),
            (DType::F32, vec![2], vec![10., 11.])
        );
        // a sharded .bin checkpoint through its index
        let sharded = tempfile::tempdir().unwrap();
        std::fs::write(
            sharded.path().join("pytorch_model-00001-of-00001.bin"),
            checkpoint(&unhex(SD_P2), &storages(), true),
        )
        .unwrap();
        std::fs::write(
            sharded.path().join("pytorch_model.bin.index.json"),
            r#"{"weight_map": {"model.w": "pytorch_model-00001-of-00001.bin", "model.b": "pytorch_model-00001-of-00001.bin"}}"#,
        )
        .unwrap();
        let m = ModelTensors::open_dir(sharded.path(), "bin-sharded").unwrap();
        assert_eq!(m.tensors.len(), 2);
        assert_eq!(
            values(&m, "model.w"),
            (DType::BF16, vec![2, 3], vec![1., 2., 3., 4., 5., 6.])
        );
    }

    fn values(m: &ModelTensors, name: &str) -> (DType, Vec<usize>, Vec<f32>) {
        let t = m.read(name).unwrap();
        let loc = &m.tensors[name];
        (loc.dtype, loc.shape.clone(), t.data.to_vec())
    }

    #[test]
    fn pickle_reads_torch_state_dict_with_shared_storage() {
        for zip64 in [false, true] {
            let m = model(checkpoint(&unhex(SD_P2), &storages(), zip64));
            assert_eq!(m.tensors.len(), 3);
            assert_eq!(
                values(&m, "model.w"),
                (DType::BF16, vec![2, 3], vec![1., 2., 3., 4., 5., 6.])
            );
            assert_eq!(
                values(&m, "model.b"),
                (DType::F32, vec![4], vec![12., 13., 14., 15.])
            );
            assert_eq!(
                values(&m, "model.head"),
                (DType::F32, vec![2], vec![10., 11.])
            );
            let (b, h) = (&m.tensors["model.b"], &m.tensors["model.head"]);
            assert_eq!(b.offset, h.offset + 8);
            assert_eq!(
                (b.nbytes, h.nbytes, m.tensors["model.w"].nbytes),
                (16, 8, 12)
            );
            // Storage data is 64-byte aligned, as torch writes it.
            assert_eq!(h.offset % 64, 0);
        }
    }

    #[test]
    fn pickle_reads_state_dict_entry_parameters_and_subclasses() {
        for pkl in [TOP_P4, TOP_P2] {
            let m = model(checkpoint(&unhex(pkl), &storages(), false));
            assert_eq!(m.tensors.len(), 2, "{:?}", m.tensors.keys());
            assert_eq!(
                values(&m, "p"),
                (DType::F32, vec![2, 2], vec![14., 15., 16., 17.])
            );
            assert_eq!(values(&m, "t"), (DType::BF16, vec![3], vec![4., 5., 6.]));
        }
    }

    /// Protocol-2 pickle writer for hand-made cases.
    struct Pk(Vec<u8>);

    impl Pk {
        fn new() -> Pk {
            Pk(vec![0x80, 2])
        }
        fn op(&mut self, b: &[u8]) -> &mut Pk {
            self.0.extend_from_slice(b);
            self
        }
        fn global(&mut self, m: &str, n: &str) -> &mut Pk {
            self.op(format!("c{m}\n{n}\n").as_bytes())
        }
        fn s(&mut self, s: &str) -> &mut Pk {
            self.op(b"X")
                .op(&(s.len() as u32).to_le_bytes())
                .op(s.as_bytes())
        }
        fn int(&mut self, i: i64) -> &mut Pk {
            self.op(b"J").op(&(i as i32).to_le_bytes())
        }
        fn ints(&mut self, v: &[i64]) -> &mut Pk {
            self.op(b"(");
            for &i in v {
                self.int(i);
            }
            self.op(b"t")
        }
        fn tensor(
            &mut self,
            storage: &str,
            key: &str,
            numel: i64,
            offset: i64,
            shape: &[i64],
            stride: &[i64],
        ) -> &mut Pk {
            self.global("torch._utils", "_rebuild_tensor_v2")
                .op(b"((")
                .s("storage")
                .global("torch", storage)
                .s(key)
                .s("cpu")
                .int(numel)
                .op(b"tQ")
                .int(offset)
                .ints(shape)
                .ints(stride)
                .op(&[0x89])
                .global("collections", "OrderedDict")
                .op(b")RtR")
        }
        /// `{name: tensor, ...}` from (name, storage type, key, numel, offset,
        /// shape, stride).
        #[allow(clippy::type_complexity)]
        fn state_dict(tensors: &[(&str, &str, &str, i64, i64, &[i64], &[i64])]) -> Vec<u8> {
            let mut p = Pk::new();
            p.op(b"}(");
            for (name, st, key, numel, off, shape, stride) in tensors {
                p.s(name).tensor(st, key, *numel, *off, shape, stride);
            }
            p.op(b"u.");
            p.0
        }
    }

    fn err_of(file: Vec<u8>) -> String {
        match read_bin_index(&Mem(file), 0) {
            Ok(t) => panic!("expected an error, got {t:?}"),
            Err(e) => e.to_string(),
        }
    }

    #[test]
    fn pickle_maps_every_storage_type() {
        let kinds = [
            ("FloatStorage", DType::F32),
            ("DoubleStorage", DType::F64),
            ("HalfStorage", DType::F16),
            ("BFloat16Storage", DType::BF16),
            ("LongStorage", DType::I64),
            ("IntStorage", DType::I32),
            ("ShortStorage", DType::I16),
            ("CharStorage", DType::I8),
            ("ByteStorage", DType::U8),
            ("BoolStorage", DType::Bool),
        ];
        let keys: Vec<String> = (0..kinds.len()).map(|i| i.to_string()).collect();
        let rows: Vec<_> = kinds
            .iter()
            .zip(&keys)
            .map(|((st, _), k)| (&st[..], *st, &k[..], 6i64, 1i64, &[5i64][..], &[1i64][..]))
            .collect();
        let pkl = Pk::state_dict(&rows);
        let data: Vec<(&str, Vec<u8>)> = kinds
            .iter()
            .zip(&keys)
            .map(|((_, dt), k)| (&k[..], vec![7u8; 6 * dt.size()]))
            .collect();
        let file = checkpoint(&pkl, &data, false);
        let idx = read_bin_index(&Mem(file.clone()), 3).unwrap();
        for (st, dt) in kinds {
            let loc = &idx[st];
            assert_eq!((loc.dtype, loc.shape.clone(), loc.shard), (dt, vec![5], 3));
            assert_eq!(loc.nbytes, 5 * dt.size() as u64);
            assert_eq!(
                loc.offset % 64,
                dt.size() as u64,
                "{st}: offset 1 element in"
            );
        }
    }

    #[test]
    fn pickle_rejects_unknown_globals_without_running_them() {
        let s = storages();
        // os.system("...") via GLOBAL + REDUCE.
        let mut p = Pk::new();
        p.global("os", "system")
            .s("touch /tmp/smelt-pwned")
            .op(&[0x85])
            .op(b"R.");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(e.contains("mem.bin") && e.contains("`os.system`"), "{e}");
        // builtins.eval via STACK_GLOBAL inside an otherwise valid state dict.
        let mut p = Pk::new();
        p.op(b"}(")
            .s("x")
            .s("builtins")
            .s("eval")
            .op(&[0x93])
            .s("1")
            .op(&[0x85])
            .op(b"Ru.");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(e.contains("`builtins.eval`"), "{e}");
        // An unsupported storage type is an unknown global too.
        let pkl = Pk::state_dict(&[("c", "ComplexFloatStorage", "0", 1, 0, &[1], &[1])]);
        let e = err_of(checkpoint(&pkl, &s, false));
        assert!(e.contains("`torch.ComplexFloatStorage`"), "{e}");
        // Object-building opcodes are refused outright.
        let mut p = Pk::new();
        p.op(b"(ios\nsystem\n.");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(e.contains("INST"), "{e}");
        assert!(!std::path::Path::new("/tmp/smelt-pwned").exists());
    }

    #[test]
    fn pickle_rejects_non_contiguous_tensors() {
        let pkl = Pk::state_dict(&[("w.t", "FloatStorage", "1", 8, 0, &[2, 3], &[1, 2])]);
        let e = err_of(checkpoint(&pkl, &storages(), false));
        assert!(
            e.contains("mem.bin") && e.contains("tensor w.t") && e.contains("non-contiguous"),
            "{e}"
        );
        // A size-1 dimension may carry any stride.
        let pkl = Pk::state_dict(&[("w", "FloatStorage", "1", 8, 1, &[1, 3, 2], &[99, 2, 1])]);
        let idx = read_bin_index(&Mem(checkpoint(&pkl, &storages(), false)), 0).unwrap();
        assert_eq!(
            (idx["w"].nbytes, idx["w"].shape.clone()),
            (24, vec![1, 3, 2])
        );
    }

    #[test]
    fn pickle_rejects_out_of_range_and_missing_storages() {
        let s = storages();
        let pkl = Pk::state_dict(&[("big", "FloatStorage", "1", 8, 5, &[4], &[1])]);
        let e = err_of(checkpoint(&pkl, &s, false));
        assert!(
            e.contains("tensor big") && e.contains("past the end of storage 1"),
            "{e}"
        );
        // Storage claims 100 elements but the entry holds 8.
        let pkl = Pk::state_dict(&[("w", "FloatStorage", "1", 100, 0, &[50], &[1])]);
        let e = err_of(checkpoint(&pkl, &s, false));
        assert!(
            e.contains("tensor w") && e.contains("archive/data/1"),
            "{e}"
        );
        let pkl = Pk::state_dict(&[("w", "FloatStorage", "7", 2, 0, &[2], &[1])]);
        let e = err_of(checkpoint(&pkl, &s, false));
        assert!(
            e.contains("tensor w") && e.contains("archive/data/7"),
            "{e}"
        );
        // The same storage key with two different types.
        let pkl = Pk::state_dict(&[
            ("a", "FloatStorage", "1", 8, 0, &[2], &[1]),
            ("b", "IntStorage", "1", 8, 0, &[2], &[1]),
        ]);
        let e = err_of(checkpoint(&pkl, &s, false));
        assert!(e.contains("storage 1"), "{e}");
    }

    #[test]
    fn pickle_rejects_compressed_entries_and_other_formats() {
        let pkl = unhex(SD_P2);
        let s = storages();
        let entries = [
            Entry {
                name: "archive/data.pkl".into(),
                data: &pkl,
                method: 0,
            },
            Entry {
                name: "archive/data/0".into(),
                data: &s[0].1,
                method: 0,
            },
            Entry {
                name: "archive/data/1".into(),
                data: &s[1].1,
                method: 8,
            },
        ];
        let e = err_of(zip(&entries, false));
        assert!(
            e.contains("tensor model.b") && e.contains("compressed"),
            "{e}"
        );
        let entries = [Entry {
            name: "archive/data.pkl".into(),
            data: &pkl,
            method: 8,
        }];
        let e = err_of(zip(&entries, false));
        assert!(e.contains("archive/data.pkl is compressed"), "{e}");
        // Legacy (pre-1.6) format: a bare pickle stream.
        let e = err_of(unhex("80028a0a6cfc9c46f9206aa85019"));
        assert!(e.contains("legacy torch.save format"), "{e}");
        // A zip without data.pkl, and safetensors bytes.
        let e = err_of(zip(
            &[Entry {
                name: "x.txt".into(),
                data: b"hi",
                method: 0,
            }],
            false,
        ));
        assert!(e.contains("no <archive>/data.pkl"), "{e}");
        let e = err_of(b"\x10\0\0\0\0\0\0\0{}              ".to_vec());
        assert!(e.contains("not a zip archive"), "{e}");
        // Big-endian checkpoints.
        let entries = [
            Entry {
                name: "archive/data.pkl".into(),
                data: &pkl,
                method: 0,
            },
            Entry {
                name: "archive/byteorder".into(),
                data: b"big",
                method: 0,
            },
        ];
        let e = err_of(zip(&entries, false));
        assert!(e.contains("byte order"), "{e}");
    }

    #[test]
    fn pickle_requires_a_state_dict() {
        let s = storages();
        let mut p = Pk::new();
        p.op(b"}(").s("epoch").int(3).s("args").op(b"N").op(b"u.");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(
            e.contains("contains no tensors") && e.contains("epoch, args"),
            "{e}"
        );
        let mut p = Pk::new();
        p.op(b"]").op(b".");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(e.contains("holds a list, not a state dict"), "{e}");
        // A million nested tuples: no recursion, no stack overflow.
        let mut p = Pk::new();
        p.int(1);
        p.0.extend(std::iter::repeat_n(0x85u8, 1_000_000));
        p.op(b".");
        let e = err_of(checkpoint(&p.0, &s, false));
        assert!(e.contains("holds a tuple"), "{e}");
    }

    #[test]
    fn pickle_truncated_files_error_without_panic() {
        let pkl = unhex(SD_P2);
        for zip64 in [false, true] {
            let file = checkpoint(&pkl, &storages(), zip64);
            for cut in 0..file.len() {
                assert!(
                    read_bin_index(&Mem(file[..cut].to_vec()), 0).is_err(),
                    "cut at {cut} of {}",
                    file.len()
                );
            }
        }
        for cut in 0..pkl.len() {
            let file = checkpoint(&pkl[..cut], &storages(), false);
            let e = err_of(file);
            assert!(e.contains("archive/data.pkl"), "cut {cut}: {e}");
        }
    }

    #[test]
    fn pickle_corrupted_bytes_never_panic() {
        let mut state = 0x9E37_79B9_7F4A_7C15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        for pkl in [unhex(SD_P2), unhex(TOP_P4)] {
            for zip64 in [false, true] {
                let file = checkpoint(&pkl, &storages(), zip64);
                for _ in 0..3000 {
                    let mut f = file.clone();
                    for _ in 0..1 + next() % 4 {
                        let i = (next() % f.len() as u64) as usize;
                        f[i] = next() as u8;
                    }
                    let _ = read_bin_index(&Mem(f), 0);
                    // Corrupt the pickle alone, keeping the zip intact.
                    let mut p = pkl.clone();
                    let i = (next() % p.len() as u64) as usize;
                    p[i] = next() as u8;
                    let _ = read_bin_index(&Mem(checkpoint(&p, &storages(), zip64)), 0);
                }
            }
        }
    }
}
