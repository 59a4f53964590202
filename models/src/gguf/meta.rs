//! GGUF metadata values (scalars, strings, and arrays kept packed as read) and the
//! bounds-checked reader of the file's header.
use std::path::Path;
use std::sync::Arc;

use crate::error::{ModelError, Result};
use llama_graph::quant::Bytes;

/// A metadata value.
#[derive(Debug, Clone, PartialEq)]
pub enum MetaValue {
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
    /// An array of numbers or booleans (token types, scores), read where the file
    /// stores it.
    Numbers(Box<NumArray>),
    /// An array of strings (a vocabulary, merges), read where the file stores it.
    Strings(Box<StrArray>),
    /// An array of arrays.
    Array(Vec<MetaValue>),
}

/// Bytes of an array's items as GGUF lays them out, in the mapped file (or, for arrays
/// made in memory, a buffer of our own): a 50k-token vocabulary costs no memory until
/// it is read, and reading it again after the model's pages were released is valid.
#[derive(Clone)]
struct Items {
    store: Arc<dyn Bytes>,
    range: std::ops::Range<usize>,
    len: usize,
}

impl Items {
    fn owned(bytes: Vec<u8>, len: usize) -> Items {
        Items {
            range: 0..bytes.len(),
            store: Arc::new(bytes),
            len,
        }
    }

    fn bytes(&self) -> &[u8] {
        &self.store.bytes()[self.range.clone()]
    }
}

/// An array of strings of a GGUF file, each read from the file when asked for.
#[derive(Clone)]
pub struct StrArray(Items);

impl StrArray {
    pub fn len(&self) -> usize {
        self.0.len
    }

    pub fn is_empty(&self) -> bool {
        self.0.len == 0
    }

    /// String `i` (a walk over the strings before it: GGUF stores no index).
    pub fn get(&self, i: usize) -> Option<&str> {
        self.iter().nth(i)
    }

    pub fn iter(&self) -> impl Iterator<Item = &str> {
        let mut rest = self.0.bytes();
        (0..self.0.len).map(move |_| {
            // Lengths and UTF-8 were checked when the file was opened.
            let (n, tail) = rest.split_at_checked(8).unwrap_or((&[0; 8], &[]));
            let n = u64::from_le_bytes(n.try_into().unwrap_or_default()) as usize;
            let (s, tail) = tail.split_at_checked(n).unwrap_or((&[], &[]));
            rest = tail;
            std::str::from_utf8(s).unwrap_or_default()
        })
    }
}

impl<'a> FromIterator<&'a str> for StrArray {
    fn from_iter<I: IntoIterator<Item = &'a str>>(iter: I) -> Self {
        let (mut bytes, mut len) = (Vec::new(), 0);
        for s in iter {
            bytes.extend_from_slice(&(s.len() as u64).to_le_bytes());
            bytes.extend_from_slice(s.as_bytes());
            len += 1;
        }
        StrArray(Items::owned(bytes, len))
    }
}

impl PartialEq for StrArray {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for StrArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

/// An array of numbers (or booleans) of one GGUF type, each read when asked for.
#[derive(Clone)]
pub struct NumArray {
    items: Items,
    /// The GGUF type of the items (0-7 or 10-12; 8 is strings, 9 arrays).
    ty: u32,
}

/// Bytes per item of a GGUF number type.
fn number_size(ty: u32) -> Option<usize> {
    match ty {
        0 | 1 | 7 => Some(1),
        2 | 3 => Some(2),
        4..=6 => Some(4),
        10..=12 => Some(8),
        _ => None,
    }
}

impl NumArray {
    pub fn len(&self) -> usize {
        self.items.len
    }

    pub fn is_empty(&self) -> bool {
        self.items.len == 0
    }

    pub fn get(&self, i: usize) -> Option<MetaValue> {
        let size = number_size(self.ty)?;
        let b = self.items.bytes().get(i * size..(i + 1) * size)?;
        let mut c = Cursor {
            buf: b,
            pos: 0,
            path: Path::new(""),
            store: None,
        };
        c.value(self.ty, 0).ok()
    }

    pub fn iter(&self) -> impl Iterator<Item = MetaValue> + '_ {
        (0..self.len()).filter_map(|i| self.get(i))
    }
}

impl FromIterator<MetaValue> for NumArray {
    /// Items of the first one's type; others of another type are left out.
    fn from_iter<I: IntoIterator<Item = MetaValue>>(iter: I) -> Self {
        let (mut bytes, mut len, mut ty) = (Vec::new(), 0, None);
        for v in iter {
            let (t, b): (u32, Vec<u8>) = match v {
                MetaValue::U8(x) => (0, x.to_le_bytes().into()),
                MetaValue::I8(x) => (1, x.to_le_bytes().into()),
                MetaValue::U16(x) => (2, x.to_le_bytes().into()),
                MetaValue::I16(x) => (3, x.to_le_bytes().into()),
                MetaValue::U32(x) => (4, x.to_le_bytes().into()),
                MetaValue::I32(x) => (5, x.to_le_bytes().into()),
                MetaValue::F32(x) => (6, x.to_le_bytes().into()),
                MetaValue::Bool(x) => (7, vec![x as u8]),
                MetaValue::U64(x) => (10, x.to_le_bytes().into()),
                MetaValue::I64(x) => (11, x.to_le_bytes().into()),
                MetaValue::F64(x) => (12, x.to_le_bytes().into()),
                _ => continue,
            };
            if *ty.get_or_insert(t) == t {
                bytes.extend(b);
                len += 1;
            }
        }
        NumArray {
            items: Items::owned(bytes, len),
            ty: ty.unwrap_or(0),
        }
    }
}

impl PartialEq for NumArray {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.iter().eq(other.iter())
    }
}

impl std::fmt::Debug for NumArray {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.iter()).finish()
    }
}

impl MetaValue {
    pub fn as_u64(&self) -> Option<u64> {
        match *self {
            MetaValue::U8(v) => Some(v as u64),
            MetaValue::U16(v) => Some(v as u64),
            MetaValue::U32(v) => Some(v as u64),
            MetaValue::U64(v) => Some(v),
            MetaValue::I8(v) => u64::try_from(v).ok(),
            MetaValue::I16(v) => u64::try_from(v).ok(),
            MetaValue::I32(v) => u64::try_from(v).ok(),
            MetaValue::I64(v) => u64::try_from(v).ok(),
            _ => None,
        }
    }

    pub fn as_f64(&self) -> Option<f64> {
        match *self {
            MetaValue::F32(v) => Some(v as f64),
            MetaValue::F64(v) => Some(v),
            _ => self.as_u64().map(|v| v as f64),
        }
    }

    pub fn as_str(&self) -> Option<&str> {
        match self {
            MetaValue::String(s) => Some(s),
            _ => None,
        }
    }

    pub fn as_bool(&self) -> Option<bool> {
        match *self {
            MetaValue::Bool(b) => Some(b),
            _ => None,
        }
    }

    /// An array of numbers or booleans.
    pub fn as_numbers(&self) -> Option<&NumArray> {
        match self {
            MetaValue::Numbers(v) => Some(v),
            _ => None,
        }
    }

    /// An array of arrays.
    pub fn as_array(&self) -> Option<&[MetaValue]> {
        match self {
            MetaValue::Array(v) => Some(v),
            _ => None,
        }
    }

    /// An array of strings.
    pub fn as_strings(&self) -> Option<&StrArray> {
        match self {
            MetaValue::Strings(v) => Some(v),
            _ => None,
        }
    }

    /// A short description for listings: arrays by length only.
    pub fn brief(&self) -> String {
        match self {
            MetaValue::Array(v) => format!("[{} arrays]", v.len()),
            MetaValue::Numbers(v) => format!("[{} values]", v.len()),
            MetaValue::Strings(v) => format!("[{} strings]", v.len()),
            MetaValue::String(s) if s.len() > 80 => {
                format!("{:?}...", &s[..s.floor_char_boundary(80)])
            }
            MetaValue::String(s) => format!("{s:?}"),
            other => format!("{other:?}"),
        }
    }
}

/// Bounds-checked little-endian reads over the mapped file.
pub(super) struct Cursor<'a> {
    pub(super) buf: &'a [u8],
    pub(super) pos: usize,
    pub(super) path: &'a Path,
    /// What `buf` is, for arrays that stay where they are.
    pub(super) store: Option<&'a Arc<dyn Bytes>>,
}

impl<'a> Cursor<'a> {
    pub(super) fn err(&self, what: &str) -> ModelError {
        ModelError::Gguf {
            path: self.path.to_path_buf(),
            message: format!("{what} at byte {}", self.pos),
        }
    }

    pub(super) fn take(&mut self, n: usize, what: &str) -> Result<&'a [u8]> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.buf.len());
        let Some(end) = end else {
            return Err(self.err(&format!("file ends inside {what}")));
        };
        let s = &self.buf[self.pos..end];
        self.pos = end;
        Ok(s)
    }

    pub(super) fn array<const N: usize>(&mut self, what: &str) -> Result<[u8; N]> {
        let s = self.take(N, what)?;
        let mut a = [0u8; N];
        a.copy_from_slice(s);
        Ok(a)
    }

    pub(super) fn u32(&mut self, what: &str) -> Result<u32> {
        Ok(u32::from_le_bytes(self.array(what)?))
    }

    pub(super) fn u64(&mut self, what: &str) -> Result<u64> {
        Ok(u64::from_le_bytes(self.array(what)?))
    }

    /// A length that must fit in what is left of the file, `unit` bytes per item.
    pub(super) fn len(&mut self, what: &str, unit: usize) -> Result<usize> {
        let n = self.u64(what)?;
        let left = (self.buf.len() - self.pos) as u64;
        if n.saturating_mul(unit as u64) > left {
            return Err(self.err(&format!(
                "{what} claims {n} items, more than the file holds"
            )));
        }
        Ok(n as usize)
    }

    /// The `n` items read from `start` up to here.
    fn items(&self, start: usize, n: usize) -> Items {
        match self.store {
            Some(store) => Items {
                store: store.clone(),
                range: start..self.pos,
                len: n,
            },
            None => Items::owned(self.buf[start..self.pos].to_vec(), n),
        }
    }

    pub(super) fn string(&mut self, what: &str) -> Result<String> {
        let n = self.len(what, 1)?;
        let bytes = self.take(n, what)?;
        String::from_utf8(bytes.to_vec()).map_err(|_| self.err(&format!("{what} is not UTF-8")))
    }

    pub(super) fn value(&mut self, ty: u32, depth: usize) -> Result<MetaValue> {
        Ok(match ty {
            0 => MetaValue::U8(self.array::<1>("u8")?[0]),
            1 => MetaValue::I8(self.array::<1>("i8")?[0] as i8),
            2 => MetaValue::U16(u16::from_le_bytes(self.array("u16")?)),
            3 => MetaValue::I16(i16::from_le_bytes(self.array("i16")?)),
            4 => MetaValue::U32(self.u32("u32")?),
            5 => MetaValue::I32(i32::from_le_bytes(self.array("i32")?)),
            6 => MetaValue::F32(f32::from_le_bytes(self.array("f32")?)),
            7 => MetaValue::Bool(self.array::<1>("bool")?[0] != 0),
            8 => MetaValue::String(self.string("string")?),
            9 => {
                if depth > 4 {
                    return Err(self.err("arrays nested too deep"));
                }
                let item = self.u32("array type")?;
                if let Some(size) = number_size(item) {
                    let n = self.len("array", size)?;
                    let start = self.pos;
                    self.take(n * size, "array")?;
                    return Ok(MetaValue::Numbers(Box::new(NumArray {
                        items: self.items(start, n),
                        ty: item,
                    })));
                }
                if item == 8 {
                    let n = self.len("array", 8)?;
                    let start = self.pos;
                    for _ in 0..n {
                        let len = self.len("string", 1)?;
                        let bytes = self.take(len, "string")?;
                        std::str::from_utf8(bytes)
                            .map_err(|_| self.err("a string of an array is not UTF-8"))?;
                    }
                    return Ok(MetaValue::Strings(Box::new(StrArray(self.items(start, n)))));
                }
                let n = self.len("array", 1)?;
                let mut v = Vec::with_capacity(n.min(1 << 10));
                for _ in 0..n {
                    v.push(self.value(item, depth + 1)?);
                }
                MetaValue::Array(v)
            }
            10 => MetaValue::U64(self.u64("u64")?),
            11 => MetaValue::I64(i64::from_le_bytes(self.array("i64")?)),
            12 => MetaValue::F64(f64::from_le_bytes(self.array("f64")?)),
            other => return Err(self.err(&format!("unknown metadata type {other}"))),
        })
    }
}
