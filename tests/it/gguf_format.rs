//! GGUF reading: every metadata type, alignment, every tensor type's dequantization
//! against the `gguf` Python package, and malformed files.

use crate::common::gguf_writer::{gguf_string, Writer};
use llama::models::gguf::{GgufFile, MetaValue};
use llama::models::quant::GgmlType;
use serde::Deserialize;

#[derive(Deserialize)]
struct Fixture {
    cases: Vec<Case>,
}

#[derive(Deserialize)]
struct Case {
    #[serde(rename = "type")]
    name: String,
    type_id: u32,
    shape: Vec<usize>,
    bytes: String,
    values: Vec<f32>,
}

fn unhex(s: &str) -> Vec<u8> {
    (0..s.len())
        .step_by(2)
        .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
        .collect()
}

#[test]
fn dequantization_matches_the_reference_for_every_type() {
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/fixtures/dequant.json");
    let fixture: Fixture = serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut w = Writer::default();
    for c in &fixture.cases {
        w.tensor(&c.name, &c.shape, c.type_id, unhex(&c.bytes));
    }
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("types.gguf");
    w.write(&file);
    let gguf = GgufFile::open(&file).expect("opens");
    let mut seen = Vec::new();
    for c in &fixture.cases {
        let t = gguf.tensor(&c.name).expect("tensor present");
        assert_eq!(t.ty.name(), c.name);
        assert_eq!(t.shape, c.shape);
        let got = gguf.dequantize(t);
        assert_eq!(got.len(), c.values.len());
        for (i, (g, e)) in got.iter().zip(&c.values).enumerate() {
            assert!(
                (g - e).abs() <= 1e-6 * e.abs().max(1.0),
                "{} value {i}: {g} vs {e}",
                c.name
            );
        }
        seen.push(t.ty);
    }
    for ty in [
        GgmlType::F32,
        GgmlType::F16,
        GgmlType::BF16,
        GgmlType::Q4_0,
        GgmlType::Q4_1,
        GgmlType::Q5_0,
        GgmlType::Q5_1,
        GgmlType::Q8_0,
        GgmlType::Q4K,
        GgmlType::Q5K,
        GgmlType::Q6K,
    ] {
        assert!(seen.contains(&ty), "{} is covered", ty.name());
    }
}

#[test]
fn metadata_of_every_type_and_custom_alignment() {
    let mut w = Writer {
        alignment: 64,
        ..Default::default()
    };
    let mut arr = 6u32.to_le_bytes().to_vec();
    arr.extend_from_slice(&2u64.to_le_bytes());
    arr.extend_from_slice(&1.5f32.to_le_bytes());
    arr.extend_from_slice(&(-2.0f32).to_le_bytes());
    let mut strings = 8u32.to_le_bytes().to_vec();
    strings.extend_from_slice(&2u64.to_le_bytes());
    strings.extend(gguf_string("a"));
    strings.extend(gguf_string("bc"));
    // An array of two arrays: [u8; 2] and [strings; 1].
    let mut nested = 9u32.to_le_bytes().to_vec();
    nested.extend_from_slice(&2u64.to_le_bytes());
    nested.extend_from_slice(&0u32.to_le_bytes());
    nested.extend_from_slice(&2u64.to_le_bytes());
    nested.extend_from_slice(&[7, 9]);
    nested.extend_from_slice(&8u32.to_le_bytes());
    nested.extend_from_slice(&1u64.to_le_bytes());
    nested.extend(gguf_string("xyz"));
    w.kv("general.alignment", 4, 64u32.to_le_bytes().to_vec())
        .kv("t.u8", 0, vec![200])
        .kv("t.i8", 1, vec![0xFE])
        .kv("t.u16", 2, 60000u16.to_le_bytes().to_vec())
        .kv("t.i16", 3, (-300i16).to_le_bytes().to_vec())
        .kv("t.u32", 4, 4_000_000_000u32.to_le_bytes().to_vec())
        .kv("t.i32", 5, (-5i32).to_le_bytes().to_vec())
        .kv("t.f32", 6, 0.25f32.to_le_bytes().to_vec())
        .kv("t.bool", 7, vec![1])
        .kv("t.string", 8, gguf_string("héllo"))
        .kv("t.array", 9, arr)
        .kv("t.strings", 9, strings)
        .kv("t.nested", 9, nested)
        .kv("t.u64", 10, u64::MAX.to_le_bytes().to_vec())
        .kv("t.i64", 11, i64::MIN.to_le_bytes().to_vec())
        .kv("t.f64", 12, 1e300f64.to_le_bytes().to_vec());
    w.tensor(
        "a",
        &[2, 3],
        0,
        [1f32, 2., 3., 4., 5., 6.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    );
    w.tensor(
        "b",
        &[4],
        0,
        [7f32, 8., 9., 10.]
            .iter()
            .flat_map(|x| x.to_le_bytes())
            .collect(),
    );
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("meta.gguf");
    w.write(&file);
    let g = GgufFile::open(&file).expect("opens");
    let m = |k: &str| g.get(k).unwrap_or_else(|| panic!("{k}")).clone();
    assert_eq!(m("t.u8"), MetaValue::U8(200));
    assert_eq!(m("t.i8"), MetaValue::I8(-2));
    assert_eq!(m("t.u16"), MetaValue::U16(60000));
    assert_eq!(m("t.i16"), MetaValue::I16(-300));
    assert_eq!(m("t.u32"), MetaValue::U32(4_000_000_000));
    assert_eq!(m("t.i32"), MetaValue::I32(-5));
    assert_eq!(m("t.f32"), MetaValue::F32(0.25));
    assert_eq!(m("t.bool"), MetaValue::Bool(true));
    assert_eq!(m("t.string"), MetaValue::String("héllo".into()));
    assert_eq!(
        m("t.array"),
        MetaValue::Numbers(Box::new(
            [MetaValue::F32(1.5), MetaValue::F32(-2.0)]
                .into_iter()
                .collect()
        ))
    );
    assert_eq!(
        m("t.strings"),
        MetaValue::Strings(Box::new(["a", "bc"].into_iter().collect()))
    );
    let strings = m("t.strings");
    let strings = strings.as_strings().unwrap();
    assert_eq!((strings.get(1), strings.get(2)), (Some("bc"), None));
    assert_eq!(
        m("t.nested"),
        MetaValue::Array(vec![
            MetaValue::Numbers(Box::new(
                [MetaValue::U8(7), MetaValue::U8(9)].into_iter().collect()
            )),
            MetaValue::Strings(Box::new(["xyz"].into_iter().collect())),
        ])
    );
    assert_eq!(m("t.u64"), MetaValue::U64(u64::MAX));
    assert_eq!(m("t.i64"), MetaValue::I64(i64::MIN));
    assert_eq!(m("t.f64"), MetaValue::F64(1e300));
    let b = g.tensor("b").unwrap();
    assert_eq!(b.start % 64, 0, "data aligned to general.alignment");
    assert_eq!(g.dequantize(b), vec![7., 8., 9., 10.]);
    assert_eq!(
        g.dequantize(g.tensor("a").unwrap()),
        vec![1., 2., 3., 4., 5., 6.]
    );
}

fn open_err(bytes: &[u8]) -> String {
    let dir = tempfile::tempdir().unwrap();
    let file = dir.path().join("bad.gguf");
    std::fs::write(&file, bytes).unwrap();
    GgufFile::open(&file)
        .expect_err("a malformed file is refused")
        .to_string()
}

#[test]
fn malformed_files_are_refused_with_a_reason() {
    let mut w = Writer::default();
    w.kv("general.architecture", 8, gguf_string("llama"));
    w.tensor("x", &[64], 8, vec![0u8; 2 * 34]);
    let good = w.bytes();
    assert!(open_err(b"GGUX\x03\0\0\0").contains("bad magic"));
    let truncated = open_err(&good[..good.len() - 10]);
    assert!(truncated.contains("past the end"), "{truncated}");
    for cut in [30, 40, 60] {
        let err = open_err(&good[..cut]);
        assert!(
            err.contains("file ends inside") || err.contains("more than the file holds"),
            "{err}"
        );
    }
    let mut lying = good.clone();
    lying[8..16].copy_from_slice(&u64::MAX.to_le_bytes()); // tensor count
    assert!(open_err(&lying).contains("more than the file holds"));
    let mut odd = Writer::default();
    odd.tensor("y", &[33], 8, vec![0u8; 34]);
    assert!(open_err(&odd.bytes()).contains("whole number"));
    let mut unknown = Writer::default();
    unknown.tensor("z", &[32], 99, vec![0u8; 34]);
    assert!(open_err(&unknown.bytes()).contains("ggml type 99"));
}
