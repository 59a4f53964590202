//! A minimal GGUF v3 writer, so tests can make GGUF files of their own.
#![allow(dead_code)]
use std::path::Path;

/// A minimal GGUF v3 writer for tests.
#[derive(Default)]
pub struct Writer {
    pub kv: Vec<(String, u32, Vec<u8>)>,
    pub tensors: Vec<(String, Vec<u64>, u32, Vec<u8>)>,
    pub alignment: usize,
}

pub fn gguf_string(s: &str) -> Vec<u8> {
    let mut v = (s.len() as u64).to_le_bytes().to_vec();
    v.extend_from_slice(s.as_bytes());
    v
}

impl Writer {
    pub fn kv(&mut self, key: &str, ty: u32, bytes: Vec<u8>) -> &mut Self {
        self.kv.push((key.into(), ty, bytes));
        self
    }

    /// `shape` row-major, outermost first.
    pub fn tensor(&mut self, name: &str, shape: &[usize], ty: u32, bytes: Vec<u8>) -> &mut Self {
        let dims = shape.iter().rev().map(|&d| d as u64).collect();
        self.tensors.push((name.into(), dims, ty, bytes));
        self
    }

    pub fn bytes(&self) -> Vec<u8> {
        let align = if self.alignment == 0 {
            32
        } else {
            self.alignment
        };
        let mut out = b"GGUF".to_vec();
        out.extend_from_slice(&3u32.to_le_bytes());
        out.extend_from_slice(&(self.tensors.len() as u64).to_le_bytes());
        out.extend_from_slice(&(self.kv.len() as u64).to_le_bytes());
        for (k, ty, v) in &self.kv {
            out.extend(gguf_string(k));
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(v);
        }
        let mut offset = 0u64;
        let mut offsets = Vec::new();
        for (name, dims, ty, data) in &self.tensors {
            out.extend(gguf_string(name));
            out.extend_from_slice(&(dims.len() as u32).to_le_bytes());
            for d in dims {
                out.extend_from_slice(&d.to_le_bytes());
            }
            out.extend_from_slice(&ty.to_le_bytes());
            out.extend_from_slice(&offset.to_le_bytes());
            offsets.push(offset);
            offset += (data.len() as u64).div_ceil(align as u64) * align as u64;
        }
        while !out.len().is_multiple_of(align) {
            out.push(0);
        }
        let start = out.len();
        for ((_, _, _, data), off) in self.tensors.iter().zip(offsets) {
            out.resize(start + off as usize, 0);
            out.extend_from_slice(data);
        }
        out
    }

    pub fn write(&self, path: &Path) {
        std::fs::write(path, self.bytes()).unwrap();
    }
}

impl Writer {
    pub fn string(&mut self, key: &str, value: &str) -> &mut Self {
        self.kv(key, 8, gguf_string(value))
    }

    pub fn u32(&mut self, key: &str, value: u32) -> &mut Self {
        self.kv(key, 4, value.to_le_bytes().to_vec())
    }

    pub fn f32(&mut self, key: &str, value: f32) -> &mut Self {
        self.kv(key, 6, value.to_le_bytes().to_vec())
    }

    /// An F32 tensor, row-major `shape`.
    pub fn f32_tensor(&mut self, name: &str, shape: &[usize], data: &[f32]) -> &mut Self {
        self.tensor(
            name,
            shape,
            0,
            data.iter().flat_map(|x| x.to_le_bytes()).collect(),
        )
    }
}
